/* A server worker's broadcast loop (lab/comet/fanout.py): one message's WebSocket frame sent
 * to every subscriber socket of a channel, in one call from Python.
 *
 * Plain C with no Python API, loaded with ctypes and built with the host's C compiler at first
 * use (lab/cbuild.py). Python builds the list of descriptors (open sockets with nothing queued
 * in Python) and handles every socket this loop could not serve whole: this file only sends. */

#include <errno.h>
#include <sys/socket.h>

/* Send buf[0:len] to fds[0:n], non-blocking. For each socket that did not take the whole frame,
 * its index goes to bad[] and what send() returned to got[]: the bytes it took, or -errno.
 * Returns how many such sockets there were (at most n). */
int fan_send(const int *fds, int n, const char *buf, int len, int *bad, int *got)
{
    int nbad = 0;
    for (int i = 0; i < n; i++) {
        ssize_t r = send(fds[i], buf, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r == len)
            continue;
        bad[nbad] = i;
        got[nbad] = r < 0 ? -errno : (int)r;
        nbad++;
    }
    return nbad;
}

/* comet-lab load agent: the WebSocket connect-and-upgrade fast path, in C.
 *
 * What it is for: at 2,500 new connections a second, the Python path spent ~40 us of user CPU
 * per connection around ~70 us of kernel work (measured with perf and py-spy on this project's
 * 2-core VM); the bare syscalls of a connection cost ~65 us from C. This file does, for
 * WebSocket sessions only, what lab.agent.proc and lab.rawio do for a connection from its
 * start until it is upgraded and idle: socket, bind (IP_BIND_ADDRESS_NO_PORT), connect, the
 * upgrade request, the 101 response (compared byte for byte with one the Python path has
 * fully checked for the same Sec-WebSocket-Key), the record columns, the counters and the
 * connect-latency histogram. A held idle connection then costs a file descriptor and a few
 * bytes here, and no Python object at all.
 *
 * Anything else is handed to Python ("adopted"): a response that is not exactly the known
 * one (the first for each destination, any error status, frames sent with the 101), any event
 * on a held connection (a message, a close), a planned close, a connect timeout. Python then
 * builds the connection's session objects and carries on as if it had opened it itself.
 *
 * Plain C with no Python API: loaded with ctypes (lab.agent.fastpath), built with the system's
 * C compiler at first use. One context per load process. Two threads may use it: the
 * launcher (fp_run: starts the rows on schedule, sleeping in clock_nanosleep between batches,
 * so that the Python event loop need not wake every 2 ms for them) and the event-loop thread
 * (everything else). The launcher writes only rows it has not published yet (`launched`), the
 * per-fd slots of sockets it has just created (before they join the epoll set), its own
 * counters (atomic) and the lag; the event-loop thread reads rows below `launched`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#ifndef SO_TIMESTAMPNS
#define SO_TIMESTAMPNS 35
#endif

/* lab.histogram: values below 256 one bucket each, then 128 sub-buckets per power of two */
#define SUB_BITS 7
#define MAX_SHIFT 40
#define N_BUCKETS ((MAX_SHIFT + 2) << SUB_BITS)
#define MAX_VALUE ((((int64_t)2 << SUB_BITS) << MAX_SHIFT) - 1)

/* lab.agent.records.Outcome */
#define OUTCOME_OK 1
#define OUTCOME_PENDING 9

/* per-fd states */
enum { ST_NONE = 0, ST_CONNECTING = 1, ST_HANDSHAKE = 2, ST_HELD = 3 };

/* what fp_poll hands to Python */
enum { EV_ADOPT_HELD = 1, EV_ADOPT_DATA = 2, EV_FAIL = 3 };

#define MAX_EVENTS 1024
#define READ_BYTES 4096

typedef struct {
    int family;
    int has_src;
    socklen_t srclen, dstlen;
    struct sockaddr_storage src, dst;
    const char *req; /* the upgrade request (Python keeps the bytes alive) */
    int reqlen;
    int target;
} pair_t;

typedef struct {
    const char *exp; /* a whole 101 response the Python path accepted for this target */
    int explen;
} target_t;

typedef struct {
    int32_t kind, fd, i, arg; /* arg: epoll events, errno, or bytes of `after` written */
    int32_t off, len;         /* EV_ADOPT_DATA: the bytes read, in the arena */
    double ts;                /* their kernel receive time (unix s), 0 if none */
} out_t;

typedef struct {
    int64_t started, connected, open, bytes_in, bytes_out;
    int64_t launched, lag_max_ns; /* rows started so far; the largest start lag since asked */
} counts_t;

typedef struct {
    int ep;
    int n, first, step, npairs, ntargets, maxfd, ts_on;
    double start_at, mono0; /* unix time = start_at + (monotonic - mono0) */
    double *scheduled, *started, *connected;
    int8_t *outcome;
    int32_t *fd_of; /* per connection row: its fd while C owns it, else -1 */
    int32_t *row;   /* per fd: the connection row */
    uint8_t *st;    /* per fd: ST_* */
    uint16_t *off;  /* per fd: bytes of the request written (ST_CONNECTING) */
    pair_t *pairs;
    target_t *targets;
    const char *after; /* written once upgraded (subscribe frames), may be empty */
    int afterlen;
    int pend_lo; /* rows below this are no longer connecting (for fp_expired) */
    int fail_lo; /* rows below this were looked at by fp_fails */
    int32_t *err_of; /* per row: the errno its start failed with, 0 if none */
    int launched;    /* rows started (atomic: written by the launcher) */
    int stop;        /* atomic: the launcher stops at its next turn */
    int64_t l_started, l_bytes_out, lag_max_ns; /* the launcher's counts (atomic) */
    counts_t c;
    int64_t hist[N_BUCKETS];
    char arena[MAX_EVENTS * READ_BYTES / 4];
} ctx_t;

static double unix_now(const ctx_t *x) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return x->start_at + ((double)t.tv_sec + t.tv_nsec * 1e-9 - x->mono0);
}

static void hist_record(ctx_t *x, double us) {
    int64_t v = us > 0 ? (int64_t)us : 0;
    int64_t i;
    if (v < (2 << SUB_BITS)) {
        i = v;
    } else {
        if (v > MAX_VALUE) v = MAX_VALUE;
        int shift = 64 - __builtin_clzll((uint64_t)v) - (SUB_BITS + 1);
        i = ((int64_t)shift << SUB_BITS) + (v >> shift);
    }
    x->hist[i]++;
}

void *fp_new(int n, int first, int step, int npairs, int ntargets, int maxfd, double *scheduled,
             double *started, double *connected, int8_t *outcome, int ts_on, double start_at,
             double mono0) {
    ctx_t *x = calloc(1, sizeof(ctx_t));
    if (!x) return NULL;
    x->ep = epoll_create1(EPOLL_CLOEXEC);
    x->n = n;
    x->first = first;
    x->step = step;
    x->npairs = npairs;
    x->ntargets = ntargets;
    x->maxfd = maxfd;
    x->scheduled = scheduled;
    x->started = started;
    x->connected = connected;
    x->outcome = outcome;
    x->ts_on = ts_on;
    x->start_at = start_at;
    x->mono0 = mono0;
    x->fd_of = malloc(sizeof(int32_t) * (n ? n : 1));
    x->err_of = calloc(n ? n : 1, sizeof(int32_t));
    x->row = calloc(maxfd, sizeof(int32_t));
    x->st = calloc(maxfd, 1);
    x->off = calloc(maxfd, sizeof(uint16_t));
    x->pairs = calloc(npairs ? npairs : 1, sizeof(pair_t));
    x->targets = calloc(ntargets ? ntargets : 1, sizeof(target_t));
    if (x->ep < 0 || !x->fd_of || !x->err_of || !x->row || !x->st || !x->off || !x->pairs || !x->targets) {
        if (x->ep >= 0) close(x->ep);
        free(x->fd_of), free(x->err_of), free(x->row), free(x->st), free(x->off);
        free(x->pairs), free(x->targets), free(x);
        return NULL;
    }
    for (int i = 0; i < n; i++) x->fd_of[i] = -1;
    return x;
}

int fp_epoll_fd(ctx_t *x) { return x->ep; }

/* connection row i of this process is the agent's connection first + i * step, which uses
 * pair (first + i * step) % npairs (source address x destination) */
void fp_pair(ctx_t *x, int p, int family, const void *src, int srclen, const void *dst,
             int dstlen, const char *req, int reqlen, int target) {
    pair_t *q = &x->pairs[p];
    q->family = family;
    q->has_src = src != NULL && srclen > 0;
    if (q->has_src) memcpy(&q->src, src, srclen);
    q->srclen = srclen;
    memcpy(&q->dst, dst, dstlen);
    q->dstlen = dstlen;
    q->req = req;
    q->reqlen = reqlen;
    q->target = target;
}

void fp_expect(ctx_t *x, int target, const char *exp, int explen) {
    x->targets[target].exp = exp;
    x->targets[target].explen = explen;
}

void fp_after(ctx_t *x, const char *after, int afterlen) {
    x->after = after;
    x->afterlen = afterlen;
}

void fp_set_clock(ctx_t *x, double start_at, double mono0) {
    x->start_at = start_at;
    x->mono0 = mono0;
}

/* row i is the agent's connection first + i * step, which uses pair (first + i * step) % npairs */
static const pair_t *pair_of(const ctx_t *x, int i) {
    return &x->pairs[(int)(((int64_t)x->first + (int64_t)i * x->step) % x->npairs)];
}

static void forget(ctx_t *x, int fd) {
    x->fd_of[x->row[fd]] = -1;
    x->st[fd] = ST_NONE;
}

/* Start rows i_from .. i_to-1 (in order, after every row before them). A row whose socket,
 * bind, connect or request fails is closed and its errno kept for fp_fails. */
void fp_launch(ctx_t *x, int i_from, int i_to) {
    for (int i = i_from; i < i_to; i++) {
        const pair_t *q = pair_of(x, i);
        x->started[i] = unix_now(x);
        x->outcome[i] = OUTCOME_PENDING;
        __atomic_fetch_add(&x->l_started, 1, __ATOMIC_RELAXED);
        int one = 1, err = 0;
        int fd = socket(q->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            err = errno;
        } else if (fd >= x->maxfd) {
            err = EMFILE;
        } else {
            if (q->has_src &&
                (setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0 ||
                 bind(fd, (const struct sockaddr *)&q->src, q->srclen) < 0))
                err = errno;
            else if (x->ts_on && setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) < 0)
                err = errno;
            else if (connect(fd, (const struct sockaddr *)&q->dst, q->dstlen) < 0 &&
                     errno != EINPROGRESS)
                err = errno;
        }
        if (err) {
            if (fd >= 0) close(fd);
            x->err_of[i] = err;
            continue;
        }
        /* on loopback the handshake is done when connect() returns and the request goes now;
         * elsewhere it waits for EPOLLOUT */
        ssize_t w = write(fd, q->req, q->reqlen);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { /* refused, reset ... */
            err = errno;
            close(fd);
            x->err_of[i] = err;
            continue;
        }
        uint32_t mask = EPOLLIN;
        x->row[fd] = i;
        x->fd_of[i] = fd;
        if (w > 0) __atomic_fetch_add(&x->l_bytes_out, w, __ATOMIC_RELAXED);
        if (w == q->reqlen) {
            x->st[fd] = ST_HANDSHAKE;
        } else {
            x->st[fd] = ST_CONNECTING;
            x->off[fd] = w > 0 ? (uint16_t)w : 0;
            mask |= EPOLLOUT;
        }
        struct epoll_event e = {.events = mask, .data.fd = fd};
        if (epoll_ctl(x->ep, EPOLL_CTL_ADD, fd, &e) < 0) {
            err = errno;
            forget(x, fd);
            close(fd);
            x->err_of[i] = err;
        }
    }
    __atomic_store_n(&x->launched, i_to, __ATOMIC_RELEASE);
}

static double mono_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

static void sleep_until(double mono) {
    struct timespec t;
    t.tv_sec = (time_t)mono;
    t.tv_nsec = (long)((mono - (double)t.tv_sec) * 1e9);
    if (t.tv_nsec >= 1000000000L) t.tv_sec++, t.tv_nsec -= 1000000000L;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

/* The launcher: start rows i_from .. n-1 at their times (opens[i]: seconds after mono0, not
 * decreasing), waking at most once per `window` seconds while rows are due (everything due by
 * then starts together), until all are started or fp_stop. Runs in a thread of its own, so
 * that the process sleeps in C between batches. Returns the rows started. */
int fp_run(ctx_t *x, const double *opens, int i_from, double window) {
    int k = i_from, n = x->n;
    while (k < n && !__atomic_load_n(&x->stop, __ATOMIC_ACQUIRE)) {
        double el = mono_now() - x->mono0;
        if (opens[k] <= el) {
            int64_t lag = (int64_t)((el - opens[k]) * 1e9);
            int64_t seen = __atomic_load_n(&x->lag_max_ns, __ATOMIC_RELAXED);
            while (lag > seen && !__atomic_compare_exchange_n(&x->lag_max_ns, &seen, lag, 1,
                                                               __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            }
            int k1 = k;
            while (k1 < n && opens[k1] <= el) k1++;
            fp_launch(x, k, k1);
            k = k1;
            if (k >= n) break;
            double next = opens[k] > el + window ? opens[k] : el + window;
            double cap = mono_now() - x->mono0 + 0.05; /* look at `stop` 20 times a second */
            sleep_until(x->mono0 + (next < cap ? next : cap));
        } else {
            double cap = el + 0.05;
            sleep_until(x->mono0 + (opens[k] < cap ? opens[k] : cap));
        }
    }
    return k;
}

void fp_stop(ctx_t *x) { __atomic_store_n(&x->stop, 1, __ATOMIC_RELEASE); }

/* Rows whose start failed, as (row, errno) pairs, at most max, each reported once. */
int fp_fails(ctx_t *x, int32_t *pairs, int max) {
    int k = 0, top = __atomic_load_n(&x->launched, __ATOMIC_ACQUIRE);
    int i = x->fail_lo;
    for (; i < top && k < max; i++) {
        if (x->err_of[i]) {
            pairs[2 * k] = i;
            pairs[2 * k + 1] = x->err_of[i];
            k++;
        }
    }
    x->fail_lo = i;
    return k;
}

static int emit(out_t *out, int k, int kind, int fd, int i, int arg) {
    out[k].kind = kind;
    out[k].fd = fd;
    out[k].i = i;
    out[k].arg = arg;
    out[k].off = out[k].len = 0;
    out[k].ts = 0.0;
    return k + 1;
}

/* the fd leaves this context's epoll set for Python's */
static void release(ctx_t *x, int fd) {
    epoll_ctl(x->ep, EPOLL_CTL_DEL, fd, NULL);
    forget(x, fd);
}

/* Serve what is ready (at most MAX_EVENTS). Returns the number of entries written to out
 * (at most MAX_EVENTS: one per event at most); *nev = the number of events served. */
int fp_poll(ctx_t *x, out_t *out, int *nev) {
    struct epoll_event evs[MAX_EVENTS];
    int m = epoll_wait(x->ep, evs, MAX_EVENTS, 0);
    int k = 0, arena = 0;
    *nev = m > 0 ? m : 0;
    for (int j = 0; j < m; j++) {
        int fd = evs[j].data.fd;
        uint32_t ev = evs[j].events;
        int st = x->st[fd];
        int i = x->row[fd];
        if (st == ST_NONE) continue;
        if (st == ST_HELD) { /* a message, a close, an error: Python's from now on */
            release(x, fd);
            k = emit(out, k, EV_ADOPT_HELD, fd, i, (int)ev);
            continue;
        }
        if (st == ST_CONNECTING) {
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (ev & (EPOLLERR | EPOLLHUP)) {
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
                if (!soerr) soerr = ECONNRESET;
            } else if (ev & EPOLLOUT) { /* (a request this small is never written in parts
                                          * on loopback; elsewhere EPOLLOUT comes first) */
                const pair_t *q = pair_of(x, i);
                ssize_t w = write(fd, q->req + x->off[fd], q->reqlen - x->off[fd]);
                if (w < 0 && errno != EAGAIN) soerr = errno;
                if (w > 0) {
                    x->off[fd] += (uint16_t)w;
                    x->c.bytes_out += w;
                }
                if (!soerr && x->off[fd] == q->reqlen) {
                    struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
                    epoll_ctl(x->ep, EPOLL_CTL_MOD, fd, &e);
                    x->st[fd] = ST_HANDSHAKE;
                }
            }
            if (soerr) {
                forget(x, fd);
                close(fd); /* also leaves the epoll set */
                k = emit(out, k, EV_FAIL, fd, i, soerr);
            }
            continue;
        }
        /* ST_HANDSHAKE: the response */
        char *buf = x->arena + arena;
        int room = (int)sizeof x->arena - arena;
        if (room > READ_BYTES) room = READ_BYTES;
        char anc[64];
        struct iovec io = {buf, (size_t)room};
        struct msghdr mh = {.msg_iov = &io, .msg_iovlen = 1};
        if (x->ts_on) {
            mh.msg_control = anc;
            mh.msg_controllen = sizeof anc;
        }
        ssize_t r = recvmsg(fd, &mh, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (r <= 0) { /* EOF or error before the upgrade: Python reads again and classifies */
            release(x, fd);
            k = emit(out, k, EV_ADOPT_HELD, fd, i, (int)ev);
            out[k - 1].arg = -1; /* still handshaking */
            continue;
        }
        double ts = 0.0;
        if (x->ts_on) {
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_TIMESTAMPNS) {
                    struct timespec t;
                    memcpy(&t, CMSG_DATA(c), sizeof t);
                    ts = (double)t.tv_sec + t.tv_nsec * 1e-9;
                }
            }
        }
        const pair_t *q = pair_of(x, i);
        const target_t *t = &x->targets[q->target];
        if (t->exp && r == t->explen && memcmp(buf, t->exp, (size_t)r) == 0) {
            double now = ts > 0 ? ts : unix_now(x);
            x->c.bytes_in += r; /* (a response handed over is counted by Python) */
            x->connected[i] = now;
            x->outcome[i] = OUTCOME_OK;
            x->c.connected++;
            x->c.open++;
            hist_record(x, (now - x->scheduled[i]) * 1e6);
            x->st[fd] = ST_HELD;
            if (x->afterlen) {
                ssize_t w = write(fd, x->after, x->afterlen);
                if (w > 0) x->c.bytes_out += w;
                if (w != x->afterlen) { /* Python writes the rest, or sees the error */
                    release(x, fd);
                    k = emit(out, k, EV_ADOPT_HELD, fd, i, 0);
                    out[k - 1].off = w > 0 ? (int32_t)w : 0;
                    out[k - 1].len = -1; /* marks "after" not all written */
                }
            }
            continue;
        }
        /* anything else: Python parses it (and may teach us the response: fp_expect) */
        release(x, fd);
        k = emit(out, k, EV_ADOPT_DATA, fd, i, (int)ev);
        out[k - 1].off = arena;
        out[k - 1].len = (int32_t)r;
        out[k - 1].ts = ts;
        arena += (int)r;
    }
    return k;
}

/* Python takes row i over (a planned close, the end of the run): its fd and state
 * (ST_CONNECTING, ST_HANDSHAKE or ST_HELD), or -1 if C does not own it. */
int fp_release(ctx_t *x, int i, int *state) {
    int fd = x->fd_of[i];
    if (fd < 0) return -1;
    *state = x->st[fd];
    release(x, fd);
    return fd;
}

/* Rows still connecting or handshaking that started before `limit` (unix s), at most max,
 * released to Python (which fails them as timeouts). */
int fp_expired(ctx_t *x, double limit, int32_t *rows, int max) {
    int k = 0, top = __atomic_load_n(&x->launched, __ATOMIC_ACQUIRE);
    /* rows start in order: skip those settled; only rows the launcher has published (below
     * `launched`) are read: a row it is still starting may have its start time and not yet
     * its PENDING outcome */
    while (x->pend_lo < top && x->outcome[x->pend_lo] != OUTCOME_PENDING) x->pend_lo++;
    for (int i = x->pend_lo; i < top && k < max; i++) {
        if (!(x->started[i] < limit)) break;
        int fd = x->fd_of[i];
        if (fd >= 0 && x->st[fd] != ST_HELD) rows[k++] = i;
    }
    return k;
}

void fp_take_counts(ctx_t *x, counts_t *out) {
    *out = x->c;
    memset(&x->c, 0, sizeof x->c);
    out->started = __atomic_exchange_n(&x->l_started, 0, __ATOMIC_RELAXED);
    out->bytes_out += __atomic_exchange_n(&x->l_bytes_out, 0, __ATOMIC_RELAXED);
    out->launched = __atomic_load_n(&x->launched, __ATOMIC_ACQUIRE);
    out->lag_max_ns = __atomic_exchange_n(&x->lag_max_ns, 0, __ATOMIC_RELAXED);
}

/* the non-empty histogram buckets (index, count), at most max, emptied */
int fp_take_hist(ctx_t *x, int64_t *pairs, int max) {
    int k = 0;
    for (int i = 0; i < N_BUCKETS && k < max; i++) {
        if (x->hist[i]) {
            pairs[2 * k] = i;
            pairs[2 * k + 1] = x->hist[i];
            x->hist[i] = 0;
            k++;
        }
    }
    return k;
}

char *fp_arena(ctx_t *x) { return x->arena; }

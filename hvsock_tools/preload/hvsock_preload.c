/*
 * hvsock_preload: AF_VSOCK stream sockets of an unmodified Linux program, carried by the
 * emulated Hyper-V host (LD_PRELOAD; `hvsock run -- PROGRAM` sets it up).
 *
 * Every AF_VSOCK SOCK_STREAM socket the program creates is, underneath, a real AF_UNIX stream
 * socket, so read/write/send/recv/sendmsg, poll/epoll/select, fcntl(O_NONBLOCK), dup and fork
 * work on it unchanged. Its other end is the companion (hvsock_tools/vsock_companion.py), one
 * process per partition that holds the guest_client Partition and relays each Unix connection
 * to an hv socket. Only the socket-API calls are taken over here: socket, connect, bind,
 * listen, accept/accept4, getsockname/getpeername, get/setsockopt, shutdown, close, dup*,
 * fcntl(F_DUPFD*), ioctl(IOCTL_VM_SOCKETS_GET_LOCAL_CID), and the reads (one delivery is at
 * most 16 KiB, as with hv_sock). Every other socket goes straight to libc.
 *
 * Identity. Each vsock socket's Unix socket is bound, when it is created, to a unique abstract
 * name "<companion>/s/<pid>.<n>.<random>"; the companion keys all its state on that name, which
 * the kernel object carries wherever the descriptor goes (dup, fork, SCM_RIGHTS, exec). The
 * companion's ends of accepted connections are bound to "<companion>/p/<cid>.<port>.<n>", so
 * accept() learns the peer's vsock address from the real accept's address: no in-band header,
 * the byte stream stays clean.
 *
 * Control. Every operation that needs the companion opens a short control connection (one
 * request line, one reply line): a forked child never interleaves with its parent, and no
 * descriptor of ours is left in the program. The one exception is a blocking connect, the
 * commonest call: its data socket connects to "<companion>/connect" instead and carries the
 * request line and the reply line itself before any data, which saves the control connection
 * (a connect, an accept and a thread hand-off in the companion) per connect. The reply is read
 * exactly up to its newline: channel data may follow it at once.
 *
 * Non-blocking connect. A Unix connect completes at once, which would report POLLOUT too
 * early. So the data socket is connected, its send buffer filled until EAGAIN (N bytes), and
 * the request names N: the companion discards exactly N bytes once the hv connect succeeded
 * (the socket becomes writable: POLLOUT), or, when it failed, records the error, drains and
 * shuts the connection down (POLLOUT|POLLHUP). getsockopt(SO_ERROR) asks the companion out of
 * band, so nothing status-like ever appears in the data. One open file description throughout:
 * epoll registrations survive. A connect that failed leaves a dead Unix socket; connecting the
 * same descriptor again swaps a fresh one in under the same number (dup3), keeping its flags.
 *
 * The descriptor table (fd -> struct vsk) is a cache of what the kernel object and the
 * companion know: entries are shared by dup'd descriptors (refcount), copied by fork, and
 * rebuilt at start-up from the descriptors a program inherits (scan of /proc/self/fd).
 * Invariant: slot[fd] != NULL exactly when fd is a vsock socket of ours in this process.
 * Slots are read without the lock on the hot paths (read/recv/close); they are pointers
 * written atomically, and chunks of slots are never freed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#define EXPORT __attribute__((visibility("default")))

/* One hv_sock delivery: a VMBus packet's payload (MAX_PIPE_DATA_PAYLOAD). */
#define MAX_DELIVERY 16384
#define PAGE 4096
#define MAX_RING_PAGES 64
#define DEFAULT_CONNECT_TIMEOUT_MS 2000 /* VSOCK_DEFAULT_CONNECT_TIMEOUT: 2 s */
#define HVSOCKET_CONNECT_TIMEOUT_MAX_MS 300000
#define CONTROL_LINE 512

enum state { S_NEW, S_BOUND, S_LISTENING, S_CONNECTING, S_CONNECTED, S_FAILED };

struct vsk {
    int refs; /* descriptors of this process sharing the entry (dup) */
    enum state state;
    char ident[108]; /* abstract name, without the leading NUL */
    unsigned bound_cid, bound_port;
    unsigned local_cid, local_port, peer_cid, peer_port;
    int have_local, have_peer;
    unsigned long long connect_timeout_ms;
    int send_pages, recv_pages; /* asked for with SO_SNDBUF/SO_RCVBUF; 0: the default */
};

/* ---- libc ------------------------------------------------------------------------------ */

static int (*real_socket)(int, int, int);
static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_listen)(int, int);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
static int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
static int (*real_getsockopt)(int, int, int, void *, socklen_t *);
static int (*real_setsockopt)(int, int, int, const void *, socklen_t);
static int (*real_shutdown)(int, int);
static int (*real_close)(int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static int (*real_fcntl64)(int, int, ...);
static int (*real_ioctl)(int, unsigned long, ...);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_readv)(int, const struct iovec *, int);
static ssize_t (*real_recv)(int, void *, size_t, int);
static ssize_t (*real_recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
static ssize_t (*real_recvmsg)(int, struct msghdr *, int);
static ssize_t (*real_read_chk)(int, void *, size_t, size_t);
static ssize_t (*real_recv_chk)(int, void *, size_t, size_t, int);
static ssize_t (*real_recvfrom_chk)(int, void *, size_t, size_t, int, struct sockaddr *,
                                    socklen_t *);

#define RESOLVE(name)                                                                        \
    do {                                                                                     \
        if (real_##name == NULL)                                                             \
            *(void **)(&real_##name) = dlsym(RTLD_NEXT, #name);                              \
    } while (0)

static void resolve_all(void)
{
    RESOLVE(socket);
    RESOLVE(connect);
    RESOLVE(bind);
    RESOLVE(listen);
    RESOLVE(accept);
    RESOLVE(accept4);
    RESOLVE(getsockname);
    RESOLVE(getpeername);
    RESOLVE(getsockopt);
    RESOLVE(setsockopt);
    RESOLVE(shutdown);
    RESOLVE(close);
    RESOLVE(dup);
    RESOLVE(dup2);
    RESOLVE(dup3);
    RESOLVE(fcntl);
    RESOLVE(fcntl64);
    RESOLVE(ioctl);
    RESOLVE(read);
    RESOLVE(readv);
    RESOLVE(recv);
    RESOLVE(recvfrom);
    RESOLVE(recvmsg);
    *(void **)(&real_read_chk) = dlsym(RTLD_NEXT, "__read_chk");
    *(void **)(&real_recv_chk) = dlsym(RTLD_NEXT, "__recv_chk");
    *(void **)(&real_recvfrom_chk) = dlsym(RTLD_NEXT, "__recvfrom_chk");
    if (real_fcntl64 == NULL)
        real_fcntl64 = real_fcntl;
}

/* ---- the descriptor table --------------------------------------------------------------- */

#define CHUNK_BITS 10
#define CHUNK_SIZE (1 << CHUNK_BITS)
#define CHUNKS 1024 /* descriptors below 2^20 */

static struct vsk **chunks[CHUNKS];
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

/* The companion: HVSOCK_PRELOAD_SOCKET="@NAME" (an abstract Unix socket). Empty: no
 * companion, and AF_VSOCK goes to the kernel as if this library were not loaded. */
static char companion[64];
static size_t companion_len;
static unsigned long counter;

static struct vsk *slot_get(int fd)
{
    if (fd < 0 || fd >= CHUNKS * CHUNK_SIZE)
        return NULL;
    struct vsk **chunk = __atomic_load_n(&chunks[fd >> CHUNK_BITS], __ATOMIC_ACQUIRE);
    if (chunk == NULL)
        return NULL;
    return __atomic_load_n(&chunk[fd & (CHUNK_SIZE - 1)], __ATOMIC_ACQUIRE);
}

/* With table_lock held. */
static int slot_set(int fd, struct vsk *v)
{
    if (fd < 0 || fd >= CHUNKS * CHUNK_SIZE)
        return -EMFILE;
    struct vsk **chunk = chunks[fd >> CHUNK_BITS];
    if (chunk == NULL) {
        if (v == NULL)
            return 0;
        chunk = calloc(CHUNK_SIZE, sizeof(*chunk));
        if (chunk == NULL)
            return -ENOMEM;
        __atomic_store_n(&chunks[fd >> CHUNK_BITS], chunk, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&chunk[fd & (CHUNK_SIZE - 1)], v, __ATOMIC_RELEASE);
    return 0;
}

/* With table_lock held: forget fd (closed, or about to be replaced by dup2). */
static void slot_drop(int fd, int *was_last_listener, char *ident)
{
    struct vsk *v = slot_get(fd);
    if (v == NULL)
        return;
    slot_set(fd, NULL);
    if (--v->refs == 0) {
        if (was_last_listener != NULL && v->state == S_LISTENING) {
            *was_last_listener = 1;
            memcpy(ident, v->ident, sizeof(v->ident));
        }
        free(v);
    }
}

static void atfork_prepare(void) { pthread_mutex_lock(&table_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&table_lock); }
static void atfork_child(void) { pthread_mutex_unlock(&table_lock); }

/* ---- addresses --------------------------------------------------------------------------- */

static socklen_t abstract_addr(struct sockaddr_un *sun, const char *name)
{
    size_t len = strlen(name);
    memset(sun, 0, sizeof(*sun));
    sun->sun_family = AF_UNIX;
    if (len > sizeof(sun->sun_path) - 1)
        len = sizeof(sun->sun_path) - 1;
    memcpy(sun->sun_path + 1, name, len);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
}

/* The abstract name in an address from the kernel ("" when unnamed or not abstract). */
static void abstract_name(const struct sockaddr_un *sun, socklen_t len, char *out, size_t cap)
{
    size_t off = offsetof(struct sockaddr_un, sun_path);
    out[0] = '\0';
    if (len <= off + 1 || sun->sun_family != AF_UNIX || sun->sun_path[0] != '\0')
        return;
    size_t n = len - off - 1;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, sun->sun_path + 1, n);
    out[n] = '\0';
}

static int is_ours(const char *name, char kind)
{
    return companion_len > 0 && strncmp(name, companion, companion_len) == 0 &&
           name[companion_len] == '/' && name[companion_len + 1] == kind &&
           name[companion_len + 2] == '/';
}

static void put_vm_addr(struct sockaddr *addr, socklen_t *addrlen, unsigned cid, unsigned port)
{
    struct sockaddr_vm svm;
    memset(&svm, 0, sizeof(svm));
    svm.svm_family = AF_VSOCK;
    svm.svm_cid = cid;
    svm.svm_port = port;
    if (addr != NULL && addrlen != NULL) {
        size_t n = *addrlen < sizeof(svm) ? *addrlen : sizeof(svm);
        memcpy(addr, &svm, n);
    }
    if (addrlen != NULL)
        *addrlen = sizeof(svm);
}

/* Validation as vsock_addr_validate / vsock_bind do. */
static int get_vm_addr(const struct sockaddr *addr, socklen_t len, struct sockaddr_vm *out)
{
    if (addr == NULL)
        return -EFAULT;
    if (len < sizeof(struct sockaddr_vm))
        return -EINVAL;
    memcpy(out, addr, sizeof(*out));
    if (out->svm_family != AF_VSOCK)
        return -EAFNOSUPPORT;
    return 0;
}

/* ---- control connections ------------------------------------------------------------------ */

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One request line, one reply line. Returns 0, or -errno when the companion cannot be reached
 * (ECONNRESET: as a socket whose host service went away). */
static int control(const char *request, char *reply, size_t cap)
{
    struct sockaddr_un sun;
    socklen_t len = abstract_addr(&sun, companion);
    int s = real_socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    int rc;
    do {
        rc = real_connect(s, (struct sockaddr *)&sun, len);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        real_close(s);
        return -ECONNRESET;
    }
    rc = write_all(s, request, strlen(request));
    size_t got = 0;
    while (rc == 0) {
        ssize_t r = real_read(s, reply + got, cap - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            rc = -ECONNRESET;
            break;
        }
        got += (size_t)r;
        reply[got] = '\0';
        if (memchr(reply, '\n', got) != NULL || got == cap - 1)
            break;
    }
    real_close(s);
    return rc;
}

/* A blocking connect's request on its own data socket fd: one line out, then exactly one
 * line in (peeked first, so that none of the channel data behind it is taken). */
static int request_on(int fd, const char *request, char *reply, size_t cap)
{
    int rc = write_all(fd, request, strlen(request));
    size_t got = 0;
    reply[0] = '\0';
    while (rc == 0 && got < cap - 1) {
        ssize_t r = real_recv(fd, reply + got, cap - 1 - got, MSG_PEEK);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -ECONNRESET;
        char *nl = memchr(reply + got, '\n', (size_t)r);
        size_t take = nl != NULL ? (size_t)(nl - (reply + got)) + 1 : (size_t)r;
        do {
            r = real_recv(fd, reply + got, take, 0);
        } while (r < 0 && errno == EINTR);
        if (r != (ssize_t)take)
            return -ECONNRESET;
        got += take;
        reply[got] = '\0';
        if (nl != NULL)
            return 0;
    }
    return rc < 0 ? rc : -EIO; /* a line longer than any reply */
}

/* "ERR <errno> <text>": the errno. Anything else unexpected: EIO. */
static int reply_errno(const char *reply)
{
    int e = 0;
    if (sscanf(reply, "ERR %d", &e) == 1 && e > 0)
        return e;
    return EIO;
}

/* Defaults of this partition (INFO), asked once per process. */
static int info_known;
static unsigned info_local_cid = VMADDR_CID_ANY;
static int info_send_pages = 2, info_recv_pages = 3;
static unsigned long long info_timeout_ms = DEFAULT_CONNECT_TIMEOUT_MS;

static void ask_info(void)
{
    if (__atomic_load_n(&info_known, __ATOMIC_ACQUIRE))
        return;
    char reply[CONTROL_LINE];
    unsigned cid;
    int sp, rp;
    unsigned long long t;
    if (control("INFO\n", reply, sizeof(reply)) == 0 &&
        sscanf(reply, "INFO %u %d %d %llu", &cid, &sp, &rp, &t) == 4) {
        info_local_cid = cid;
        info_send_pages = sp;
        info_recv_pages = rp;
        info_timeout_ms = t;
        __atomic_store_n(&info_known, 1, __ATOMIC_RELEASE);
    }
}

/* ---- creating and identifying our sockets ------------------------------------------------- */

static void new_ident(char *out, size_t cap)
{
    unsigned long n = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long mix = (unsigned long)ts.tv_nsec ^ ((unsigned long)ts.tv_sec << 20) ^
                        ((unsigned long)(uintptr_t)&ts);
    snprintf(out, cap, "%s/s/%d.%lu.%lx", companion, (int)getpid(), n, mix & 0xffffffUL);
}

/* A fresh Unix stream socket bound to a new identity; flags: SOCK_NONBLOCK|SOCK_CLOEXEC. */
static int make_unix(int flags, char *ident, size_t cap)
{
    int s = real_socket(AF_UNIX, SOCK_STREAM | flags, 0);
    if (s < 0)
        return -errno;
    for (int tries = 0; tries < 16; tries++) {
        struct sockaddr_un sun;
        new_ident(ident, cap);
        socklen_t len = abstract_addr(&sun, ident);
        if (real_bind(s, (struct sockaddr *)&sun, len) == 0)
            return s;
        if (errno != EADDRINUSE)
            break;
    }
    int e = errno;
    real_close(s);
    return -e;
}

static struct vsk *new_vsk(const char *ident)
{
    struct vsk *v = calloc(1, sizeof(*v));
    if (v == NULL)
        return NULL;
    v->refs = 1;
    v->state = S_NEW;
    snprintf(v->ident, sizeof(v->ident), "%s", ident);
    v->bound_cid = VMADDR_CID_ANY;
    v->bound_port = VMADDR_PORT_ANY;
    return v;
}

static int register_fd(int fd, struct vsk *v)
{
    pthread_mutex_lock(&table_lock);
    slot_drop(fd, NULL, NULL); /* a stale entry: the fd was closed behind our back */
    int rc = slot_set(fd, v);
    pthread_mutex_unlock(&table_lock);
    return rc;
}

/* Copy of the entry of fd, taken under the lock (NULL: not ours). */
static int snapshot(int fd, struct vsk *out)
{
    int found = 0;
    pthread_mutex_lock(&table_lock);
    struct vsk *v = slot_get(fd);
    if (v != NULL) {
        *out = *v;
        found = 1;
    }
    pthread_mutex_unlock(&table_lock);
    return found;
}

/* Apply changes to the shared entry of fd under the lock. */
#define UPDATE(fd, body)                                                                     \
    do {                                                                                     \
        pthread_mutex_lock(&table_lock);                                                     \
        struct vsk *u_ = slot_get(fd);                                                       \
        if (u_ != NULL) {                                                                    \
            body;                                                                            \
        }                                                                                    \
        pthread_mutex_unlock(&table_lock);                                                   \
    } while (0)

/* Descriptors inherited across exec: our sockets are recognised by their abstract names. */
static void adopt_inherited(void)
{
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL)
        return;
    int self = dirfd(dir);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || fd < 0 || fd == self)
            continue;
        struct sockaddr_un local, peer;
        socklen_t llen = sizeof(local), plen = sizeof(peer);
        char lname[108], pname[108];
        if (real_getsockname((int)fd, (struct sockaddr *)&local, &llen) != 0)
            continue;
        abstract_name(&local, llen, lname, sizeof(lname));
        if (!is_ours(lname, 's'))
            continue;
        struct vsk *v = new_vsk(lname);
        if (v == NULL)
            break;
        int listening = 0;
        socklen_t ol = sizeof(listening);
        real_getsockopt((int)fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ol);
        if (listening) {
            v->state = S_LISTENING;
        } else if (real_getpeername((int)fd, (struct sockaddr *)&peer, &plen) == 0) {
            abstract_name(&peer, plen, pname, sizeof(pname));
            unsigned cid, port;
            v->state = S_CONNECTED;
            if (is_ours(pname, 'p') &&
                sscanf(pname + companion_len + 3, "%u.%u", &cid, &port) == 2) {
                v->peer_cid = cid;
                v->peer_port = port;
                v->have_peer = 1;
            }
        }
        pthread_mutex_lock(&table_lock);
        slot_set((int)fd, v);
        pthread_mutex_unlock(&table_lock);
    }
    closedir(dir);
}

__attribute__((constructor)) static void hvsock_preload_init(void)
{
    resolve_all();
    const char *where = getenv("HVSOCK_PRELOAD_SOCKET");
    if (where != NULL && where[0] == '@' && strlen(where + 1) < sizeof(companion)) {
        snprintf(companion, sizeof(companion), "%s", where + 1);
        companion_len = strlen(companion);
    }
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    if (companion_len > 0)
        adopt_inherited();
}

/* ---- socket ---------------------------------------------------------------------------------- */

EXPORT int socket(int domain, int type, int protocol)
{
    RESOLVE(socket);
    if (domain != AF_VSOCK || companion_len == 0)
        return real_socket(domain, type, protocol);
    int flags = type & (SOCK_NONBLOCK | SOCK_CLOEXEC);
    int base = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (base != SOCK_STREAM) {
        errno = ESOCKTNOSUPPORT; /* hv_sock: stream sockets only */
        return -1;
    }
    if (protocol != 0 && protocol != PF_VSOCK) {
        errno = EPROTONOSUPPORT;
        return -1;
    }
    char ident[108];
    int s = make_unix(flags, ident, sizeof(ident));
    if (s < 0) {
        errno = -s;
        return -1;
    }
    struct vsk *v = new_vsk(ident);
    int rc = v == NULL ? -ENOMEM : register_fd(s, v);
    if (rc < 0) {
        free(v);
        real_close(s);
        errno = -rc;
        return -1;
    }
    return s;
}

/* ---- bind and listen -------------------------------------------------------------------------- */

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    RESOLVE(bind);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_bind(fd, addr, len);
    struct sockaddr_vm svm;
    int rc = get_vm_addr(addr, len, &svm);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    if (v.state != S_NEW) {
        errno = EINVAL; /* already bound */
        return -1;
    }
    ask_info();
    if (info_local_cid == VMADDR_CID_ANY && svm.svm_cid != VMADDR_CID_ANY) {
        /* In a VM, hv_sock's local CID is VMADDR_CID_ANY: nothing else can be bound. */
        errno = EADDRNOTAVAIL;
        return -1;
    }
    UPDATE(fd, {
        u_->bound_cid = svm.svm_cid;
        u_->bound_port = svm.svm_port;
        u_->state = S_BOUND;
    });
    return 0;
}

EXPORT int listen(int fd, int backlog)
{
    RESOLVE(listen);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_listen(fd, backlog);
    if (v.state == S_LISTENING)
        return real_listen(fd, backlog); /* a new backlog, as the kernel allows */
    if (v.state != S_NEW && v.state != S_BOUND) {
        errno = EINVAL;
        return -1;
    }
    if (backlog < 0 || backlog > 4096)
        backlog = 4096;
    /* Listen on the Unix side first: the companion connects each hv connection to it. */
    if (real_listen(fd, backlog) < 0)
        return -1;
    char request[CONTROL_LINE], reply[CONTROL_LINE];
    snprintf(request, sizeof(request), "LISTEN %s %u %u %d\n", v.ident, v.bound_cid,
             v.bound_port, backlog);
    int rc = control(request, reply, sizeof(reply));
    unsigned cid, port;
    if (rc == 0 && sscanf(reply, "OK %u %u", &cid, &port) == 2) {
        UPDATE(fd, {
            u_->state = S_LISTENING;
            u_->local_cid = cid;
            u_->local_port = port;
            u_->have_local = 1;
        });
        return 0;
    }
    errno = rc < 0 ? -rc : reply_errno(reply);
    return -1;
}

/* ---- accept -------------------------------------------------------------------------------- */

static int do_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags, int four)
{
    struct vsk v;
    if (!snapshot(fd, &v))
        return four ? real_accept4(fd, addr, addrlen, flags) : real_accept(fd, addr, addrlen);
    if (v.state != S_LISTENING) {
        errno = EINVAL;
        return -1;
    }
    if (addr != NULL && addrlen == NULL) {
        errno = EFAULT;
        return -1;
    }
    for (;;) {
        struct sockaddr_un peer;
        socklen_t plen = sizeof(peer);
        int c = four ? real_accept4(fd, (struct sockaddr *)&peer, &plen, flags)
                     : real_accept(fd, (struct sockaddr *)&peer, &plen);
        if (c < 0)
            return -1;
        char name[108];
        unsigned cid, port;
        abstract_name(&peer, plen, name, sizeof(name));
        if (!is_ours(name, 'p') ||
            sscanf(name + companion_len + 3, "%u.%u", &cid, &port) != 2) {
            /* Not from the companion (someone else in this network namespace found the
             * abstract name): refuse it, and wait for the next. */
            real_close(c);
            continue;
        }
        struct vsk *nv = new_vsk(v.ident);
        if (nv == NULL) {
            real_close(c);
            errno = ENOMEM;
            return -1;
        }
        nv->state = S_CONNECTED;
        nv->local_cid = v.local_cid;
        nv->local_port = v.local_port;
        nv->have_local = 1;
        nv->peer_cid = cid;
        nv->peer_port = port;
        nv->have_peer = 1;
        int rc = register_fd(c, nv);
        if (rc < 0) {
            free(nv);
            real_close(c);
            errno = -rc;
            return -1;
        }
        put_vm_addr(addr, addrlen, cid, port);
        return c;
    }
}

EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
    RESOLVE(accept);
    RESOLVE(accept4);
    return do_accept(fd, addr, addrlen, 0, 0);
}

EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
    RESOLVE(accept);
    RESOLVE(accept4);
    return do_accept(fd, addr, addrlen, flags, 1);
}

/* ---- connect ---------------------------------------------------------------------------------- */

static int parse_ok(const char *reply, int fd)
{
    unsigned lc, lp, pc, pp;
    if (sscanf(reply, "OK %u %u %u %u", &lc, &lp, &pc, &pp) != 4)
        return 0;
    UPDATE(fd, {
        u_->state = S_CONNECTED;
        u_->local_cid = lc;
        u_->local_port = lp;
        u_->peer_cid = pc;
        u_->peer_port = pp;
        u_->have_local = u_->have_peer = 1;
    });
    return 1;
}

/* The result of a connect under way: 0 connected, EINPROGRESS still connecting, else its
 * errno (consumed, as SO_ERROR is). The entry is updated. */
static int connect_status(int fd, const struct vsk *v)
{
    char request[CONTROL_LINE], reply[CONTROL_LINE];
    snprintf(request, sizeof(request), "STATUS %s\n", v->ident);
    int rc = control(request, reply, sizeof(reply));
    if (rc < 0)
        return -rc;
    if (strncmp(reply, "CONNECTING", 10) == 0)
        return EINPROGRESS;
    if (parse_ok(reply, fd))
        return 0;
    if (strncmp(reply, "ERR", 3) == 0) {
        UPDATE(fd, u_->state = S_FAILED);
        return reply_errno(reply);
    }
    return EIO;
}

/* A connect failed: the Unix socket under fd is dead. Put a fresh one under the same number
 * (same flags), so the program may connect again as it may with a kernel socket. */
static int renew(int fd, struct vsk *v)
{
    int fl = real_fcntl(fd, F_GETFL);
    int fdfl = real_fcntl(fd, F_GETFD);
    if (fl < 0 || fdfl < 0)
        return -errno;
    char ident[108];
    int s = make_unix((fl & O_NONBLOCK ? SOCK_NONBLOCK : 0), ident, sizeof(ident));
    if (s < 0)
        return s;
    if (real_dup3(s, fd, (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
        int e = errno;
        real_close(s);
        return -e;
    }
    real_close(s);
    UPDATE(fd, {
        snprintf(u_->ident, sizeof(u_->ident), "%s", ident);
        u_->state = u_->bound_port == VMADDR_PORT_ANY ? S_NEW : S_BOUND;
        u_->have_local = u_->have_peer = 0;
    });
    snprintf(v->ident, sizeof(v->ident), "%s", ident);
    return 0;
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    RESOLVE(connect);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_connect(fd, addr, len);
    struct sockaddr_vm svm;
    int rc = get_vm_addr(addr, len, &svm);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    int nonblocking = (real_fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
    switch (v.state) {
    case S_LISTENING:
        errno = EINVAL;
        return -1;
    case S_CONNECTED:
        errno = EISCONN;
        return -1;
    case S_CONNECTING: {
        int st = connect_status(fd, &v);
        if (st == 0) {
            errno = EISCONN;
            return -1;
        }
        if (st == EINPROGRESS && nonblocking) {
            errno = EALREADY;
            return -1;
        }
        if (st == EINPROGRESS) {
            /* A blocking connect on a socket whose connect is under way: wait for it. */
            struct pollfd p = {fd, POLLOUT, 0};
            while (poll(&p, 1, -1) < 0 && errno == EINTR) {
            }
            st = connect_status(fd, &v);
            if (st == 0)
                return 0;
        }
        errno = st; /* the pending error, reported once (as SO_ERROR would) */
        return -1;
    }
    case S_FAILED:
        rc = renew(fd, &v);
        if (rc < 0) {
            errno = -rc;
            return -1;
        }
        break;
    default:
        break;
    }
    /* The data connection first: it is the program's descriptor from now on. A blocking
     * connect asks on it (see "Control" above). */
    RESOLVE(recv);
    char target[sizeof(companion) + 16];
    snprintf(target, sizeof(target), nonblocking ? "%s" : "%s/connect", companion);
    struct sockaddr_un sun;
    socklen_t slen = abstract_addr(&sun, target);
    /* A blocking Unix connect: it waits for room in the companion's backlog instead of
     * failing with EAGAIN, which no vsock connect returns. */
    int fl = real_fcntl(fd, F_GETFL);
    if (nonblocking)
        real_fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    do {
        rc = real_connect(fd, (struct sockaddr *)&sun, slen);
    } while (rc < 0 && errno == EINTR);
    if (nonblocking)
        real_fcntl(fd, F_SETFL, fl);
    if (rc < 0) {
        UPDATE(fd, u_->state = S_FAILED);
        errno = ECONNRESET; /* no companion: as a socket whose host service went away */
        return -1;
    }
    int send_pages = v.send_pages, recv_pages = v.recv_pages;
    if (send_pages == 0 || recv_pages == 0) {
        ask_info();
        send_pages = send_pages ? send_pages : info_send_pages;
        recv_pages = recv_pages ? recv_pages : info_recv_pages;
    }
    /* Back-pressure: the Unix connection holds at most 4 send rings' worth in flight (the
     * kernel doubles the value given), so a writer whose peer does not read blocks soon after
     * the ring is full, as with hv_sock. Less costs throughput: every wake-up is a context
     * switch through the companion (bench/bench_run.py: 4 rings ~1.4x one ring). */
    int sndbuf = (send_pages - 1) * PAGE * 2;
    real_setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    unsigned long long timeout = v.connect_timeout_ms;
    if (timeout == 0) {
        ask_info();
        timeout = info_timeout_ms;
    }
    char request[CONTROL_LINE], reply[CONTROL_LINE];
    if (!nonblocking) {
        snprintf(request, sizeof(request), "CONNECT %u %u %u %llu %d %d\n", svm.svm_cid,
                 svm.svm_port, v.bound_port, timeout, v.send_pages, v.recv_pages);
        UPDATE(fd, u_->state = S_CONNECTING);
        rc = request_on(fd, request, reply, sizeof(reply));
    } else {
        long fill = 0;
        static const char zeros[65536];
        for (;;) {
            ssize_t w = send(fd, zeros, sizeof(zeros), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) {
                fill += w;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            break; /* EAGAIN: full, POLLOUT now waits for the companion */
        }
        snprintf(request, sizeof(request), "CONNECT %s %u %u %u %llu %d %d %ld\n", v.ident,
                 svm.svm_cid, svm.svm_port, v.bound_port, timeout, v.send_pages, v.recv_pages,
                 fill);
        UPDATE(fd, u_->state = S_CONNECTING);
        rc = control(request, reply, sizeof(reply));
    }
    if (rc < 0) {
        UPDATE(fd, u_->state = S_FAILED);
        errno = -rc;
        return -1;
    }
    if (nonblocking && strncmp(reply, "STARTED", 7) == 0) {
        errno = EINPROGRESS;
        return -1;
    }
    if (parse_ok(reply, fd))
        return 0;
    UPDATE(fd, u_->state = S_FAILED);
    errno = reply_errno(reply);
    return -1;
}

/* ---- addresses and options ------------------------------------------------------------------- */

static void refresh_connected(int fd, struct vsk *v)
{
    if (v->state == S_CONNECTING)
        connect_status(fd, v); /* learns the addresses when it has connected meanwhile */
    if (v->state == S_CONNECTED && !(v->have_local && v->have_peer)) {
        char request[CONTROL_LINE], reply[CONTROL_LINE];
        snprintf(request, sizeof(request), "ADDRESSES %s\n", v->ident);
        if (control(request, reply, sizeof(reply)) == 0)
            parse_ok(reply, fd);
    }
    snapshot(fd, v);
}

EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    RESOLVE(getsockname);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_getsockname(fd, addr, len);
    if (len == NULL) {
        errno = EFAULT;
        return -1;
    }
    refresh_connected(fd, &v);
    if (v.have_local) {
        put_vm_addr(addr, len, v.local_cid, v.local_port);
    } else if (v.state == S_BOUND) {
        put_vm_addr(addr, len, v.bound_cid, v.bound_port);
    } else {
        put_vm_addr(addr, len, VMADDR_CID_ANY, VMADDR_PORT_ANY);
    }
    return 0;
}

EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    RESOLVE(getpeername);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_getpeername(fd, addr, len);
    if (len == NULL) {
        errno = EFAULT;
        return -1;
    }
    refresh_connected(fd, &v);
    if (v.state != S_CONNECTED || !v.have_peer) {
        errno = ENOTCONN;
        return -1;
    }
    put_vm_addr(addr, len, v.peer_cid, v.peer_port);
    return 0;
}

static int put_int(void *val, socklen_t *len, int value)
{
    if (val == NULL || len == NULL || *len < sizeof(int)) {
        errno = EINVAL;
        return -1;
    }
    memcpy(val, &value, sizeof(int));
    *len = sizeof(int);
    return 0;
}

static int put_u64(void *val, socklen_t *len, unsigned long long value)
{
    if (val == NULL || len == NULL || *len < sizeof(value)) {
        errno = EINVAL;
        return -1;
    }
    memcpy(val, &value, sizeof(value));
    *len = sizeof(value);
    return 0;
}

/* Ring capacity in bytes for a page count (the first page is the ring's control page). */
static int ring_bytes(int pages) { return (pages - 1) * PAGE; }

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    RESOLVE(getsockopt);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_getsockopt(fd, level, name, val, len);
    if (level == SOL_SOCKET) {
        switch (name) {
        case SO_ERROR: {
            int e = 0;
            if (v.state == S_CONNECTING) {
                e = connect_status(fd, &v);
                if (e == EINPROGRESS)
                    e = 0;
            }
            if (e == 0) {
                /* What the kernel holds for the Unix socket (a reset, say). */
                socklen_t l = sizeof(e);
                real_getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l);
            }
            return put_int(val, len, e);
        }
        case SO_DOMAIN:
            return put_int(val, len, AF_VSOCK);
        case SO_PROTOCOL:
            return put_int(val, len, 0);
        case SO_SNDBUF:
        case SO_RCVBUF: {
            ask_info();
            int pages = name == SO_SNDBUF ? v.send_pages : v.recv_pages;
            if (pages == 0)
                pages = name == SO_SNDBUF ? info_send_pages : info_recv_pages;
            return put_int(val, len, ring_bytes(pages));
        }
        case SO_PEERCRED:
        case SO_PASSCRED:
            errno = ENOPROTOOPT;
            return -1;
        default:
            return real_getsockopt(fd, level, name, val, len);
        }
    }
    if (level == AF_VSOCK) {
        switch (name) {
        case SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD:
        case SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW: {
            unsigned long long ms = v.connect_timeout_ms;
            if (ms == 0) {
                ask_info();
                ms = info_timeout_ms;
            }
            struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
            if (val == NULL || len == NULL || *len < sizeof(tv)) {
                errno = EINVAL;
                return -1;
            }
            memcpy(val, &tv, sizeof(tv));
            *len = sizeof(tv);
            return 0;
        }
        case SO_VM_SOCKETS_BUFFER_SIZE:
        case SO_VM_SOCKETS_BUFFER_MAX_SIZE: {
            ask_info();
            int pages = v.recv_pages ? v.recv_pages : info_recv_pages;
            if (name == SO_VM_SOCKETS_BUFFER_MAX_SIZE)
                pages = MAX_RING_PAGES;
            return put_u64(val, len, (unsigned long long)ring_bytes(pages));
        }
        case SO_VM_SOCKETS_BUFFER_MIN_SIZE:
            return put_u64(val, len, (unsigned long long)ring_bytes(2));
        default:
            errno = ENOPROTOOPT;
            return -1;
        }
    }
    errno = ENOPROTOOPT;
    return -1;
}

static int pages_for(int bytes)
{
    int pages = bytes / PAGE + 1;
    if (pages < 2)
        pages = 2;
    if (pages > MAX_RING_PAGES)
        pages = MAX_RING_PAGES;
    return pages;
}

EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    RESOLVE(setsockopt);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_setsockopt(fd, level, name, val, len);
    if (level == SOL_SOCKET && (name == SO_SNDBUF || name == SO_RCVBUF)) {
        int bytes;
        if (val == NULL || len < sizeof(int)) {
            errno = EINVAL;
            return -1;
        }
        memcpy(&bytes, val, sizeof(int));
        /* Rings are sized at connect (as hv_sock's hvs_open_connection reads sk_sndbuf);
         * later it changes nothing, and is no error. */
        if (v.state != S_CONNECTED && v.state != S_CONNECTING)
            UPDATE(fd, {
                if (name == SO_SNDBUF)
                    u_->send_pages = pages_for(bytes);
                else
                    u_->recv_pages = pages_for(bytes);
            });
        return 0;
    }
    if (level == SOL_SOCKET)
        return real_setsockopt(fd, level, name, val, len); /* as the kernel answers */
    if (level == AF_VSOCK) {
        switch (name) {
        case SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD:
        case SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW: {
            struct timeval tv;
            if (val == NULL || len < sizeof(tv)) {
                errno = EINVAL;
                return -1;
            }
            memcpy(&tv, val, sizeof(tv));
            /* vsock_connectible_setsockopt: ERANGE out of [0, MAX_SCHEDULE_TIMEOUT). */
            if (tv.tv_sec < 0 || tv.tv_usec < 0 || tv.tv_usec >= 1000000) {
                errno = ERANGE;
                return -1;
            }
            unsigned long long ms =
                (unsigned long long)tv.tv_sec * 1000 + (unsigned long long)tv.tv_usec / 1000;
            if (ms == 0 && tv.tv_usec > 0)
                ms = 1;
            if (ms > HVSOCKET_CONNECT_TIMEOUT_MAX_MS)
                ms = HVSOCKET_CONNECT_TIMEOUT_MAX_MS; /* the emulated host's longest */
            if (ms == 0)
                ms = 1; /* zero: give up at once, not "the default" */
            UPDATE(fd, u_->connect_timeout_ms = ms);
            return 0;
        }
        case SO_VM_SOCKETS_BUFFER_SIZE:
        case SO_VM_SOCKETS_BUFFER_MIN_SIZE:
        case SO_VM_SOCKETS_BUFFER_MAX_SIZE: {
            unsigned long long bytes;
            if (val == NULL || len < sizeof(bytes)) {
                errno = EINVAL;
                return -1;
            }
            memcpy(&bytes, val, sizeof(bytes));
            if (name == SO_VM_SOCKETS_BUFFER_SIZE && v.state != S_CONNECTED &&
                v.state != S_CONNECTING) {
                int p = pages_for(bytes > INT_MAX ? INT_MAX : (int)bytes);
                UPDATE(fd, u_->send_pages = u_->recv_pages = p);
            }
            return 0;
        }
        default:
            errno = ENOPROTOOPT;
            return -1;
        }
    }
    errno = ENOPROTOOPT;
    return -1;
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
    RESOLVE(ioctl);
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (request == IOCTL_VM_SOCKETS_GET_LOCAL_CID && companion_len > 0 && arg != NULL &&
        (slot_get(fd) != NULL || real_fcntl(fd, F_GETFD) >= 0)) {
        ask_info();
        unsigned cid = info_local_cid;
        memcpy(arg, &cid, sizeof(cid));
        return 0;
    }
    return real_ioctl(fd, request, arg);
}

/* ---- shutdown, close, dup ------------------------------------------------------------------ */

EXPORT int shutdown(int fd, int how)
{
    RESOLVE(shutdown);
    struct vsk v;
    if (!snapshot(fd, &v))
        return real_shutdown(fd, how);
    if (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR) {
        errno = EINVAL;
        return -1;
    }
    if (v.state == S_CONNECTING)
        refresh_connected(fd, &v);
    if (v.state != S_CONNECTED) {
        errno = ENOTCONN;
        return -1;
    }
    /* SHUT_WR reaches the companion as end of stream (a FIN on the channel); SHUT_RD is
     * local, as in hv_sock: the companion stops reading the channel for us. */
    return real_shutdown(fd, how);
}

static void closed_listener(const char *ident)
{
    char request[CONTROL_LINE], reply[CONTROL_LINE];
    snprintf(request, sizeof(request), "CLOSED %s\n", ident);
    int saved = errno;
    control(request, reply, sizeof(reply)); /* a hint; the companion also checks by itself */
    errno = saved;
}

EXPORT int close(int fd)
{
    RESOLVE(close);
    if (slot_get(fd) == NULL)
        return real_close(fd);
    int last_listener = 0;
    char ident[108];
    pthread_mutex_lock(&table_lock);
    slot_drop(fd, &last_listener, ident);
    pthread_mutex_unlock(&table_lock);
    int rc = real_close(fd);
    int saved = errno;
    if (last_listener)
        closed_listener(ident);
    errno = saved;
    return rc;
}

/* After a successful dup of old onto new: new shares old's entry (with table_lock held). */
static void share(int oldfd, int newfd)
{
    struct vsk *v = slot_get(oldfd);
    if (v != NULL && slot_set(newfd, v) == 0)
        v->refs++;
}

EXPORT int dup(int oldfd)
{
    RESOLVE(dup);
    if (slot_get(oldfd) == NULL)
        return real_dup(oldfd);
    pthread_mutex_lock(&table_lock);
    int fd = real_dup(oldfd);
    if (fd >= 0) {
        slot_drop(fd, NULL, NULL);
        share(oldfd, fd);
    }
    int saved = errno;
    pthread_mutex_unlock(&table_lock);
    errno = saved;
    return fd;
}

static int dup_onto(int oldfd, int newfd, int flags, int three)
{
    if (slot_get(oldfd) == NULL && slot_get(newfd) == NULL)
        return three ? real_dup3(oldfd, newfd, flags) : real_dup2(oldfd, newfd);
    int last_listener = 0;
    char ident[108];
    pthread_mutex_lock(&table_lock);
    int fd = three ? real_dup3(oldfd, newfd, flags) : real_dup2(oldfd, newfd);
    int saved = errno;
    if (fd >= 0 && oldfd != newfd) {
        slot_drop(newfd, &last_listener, ident);
        share(oldfd, newfd);
    }
    pthread_mutex_unlock(&table_lock);
    if (last_listener)
        closed_listener(ident);
    errno = saved;
    return fd;
}

EXPORT int dup2(int oldfd, int newfd)
{
    RESOLVE(dup2);
    RESOLVE(dup3);
    return dup_onto(oldfd, newfd, 0, 0);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    RESOLVE(dup2);
    RESOLVE(dup3);
    return dup_onto(oldfd, newfd, flags, 1);
}

static int do_fcntl(int (*real)(int, int, ...), int fd, int cmd, va_list ap)
{
    switch (cmd) {
    case F_DUPFD:
    case F_DUPFD_CLOEXEC: {
        int arg = va_arg(ap, int);
        if (slot_get(fd) == NULL)
            return real(fd, cmd, arg);
        pthread_mutex_lock(&table_lock);
        int nfd = real(fd, cmd, arg);
        if (nfd >= 0) {
            slot_drop(nfd, NULL, NULL);
            share(fd, nfd);
        }
        int saved = errno;
        pthread_mutex_unlock(&table_lock);
        errno = saved;
        return nfd;
    }
    /* Commands without an argument, with an int, or with a pointer (all in one word). */
    case F_GETFD:
    case F_GETFL:
    case F_GETOWN:
    case F_GETSIG:
    case F_GETLEASE:
    case F_GETPIPE_SZ:
    case F_GET_SEALS:
        return real(fd, cmd);
    default: {
        void *arg = va_arg(ap, void *);
        return real(fd, cmd, arg);
    }
    }
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    RESOLVE(fcntl);
    va_list ap;
    va_start(ap, cmd);
    int rc = do_fcntl(real_fcntl, fd, cmd, ap);
    va_end(ap);
    return rc;
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    RESOLVE(fcntl);
    RESOLVE(fcntl64);
    if (real_fcntl64 == NULL)
        real_fcntl64 = real_fcntl;
    va_list ap;
    va_start(ap, cmd);
    int rc = do_fcntl(real_fcntl64, fd, cmd, ap);
    va_end(ap);
    return rc;
}

/* ---- reads: one delivery is at most one packet's payload (16 KiB) ----------------------------- */

static size_t clamp(int fd, size_t n)
{
    return (n > MAX_DELIVERY && slot_get(fd) != NULL) ? MAX_DELIVERY : n;
}

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
    RESOLVE(read);
    return real_read(fd, buf, clamp(fd, n));
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    RESOLVE(read);
    if (real_read_chk == NULL)
        real_read_chk = (ssize_t (*)(int, void *, size_t, size_t))dlsym(RTLD_NEXT, "__read_chk");
    return real_read_chk(fd, buf, clamp(fd, n), buflen);
}

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    RESOLVE(recv);
    return real_recv(fd, buf, clamp(fd, n), flags);
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    if (real_recv_chk == NULL)
        real_recv_chk =
            (ssize_t (*)(int, void *, size_t, size_t, int))dlsym(RTLD_NEXT, "__recv_chk");
    return real_recv_chk(fd, buf, clamp(fd, n), buflen, flags);
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
                        socklen_t *alen)
{
    RESOLVE(recvfrom);
    if (slot_get(fd) == NULL)
        return real_recvfrom(fd, buf, n, flags, addr, alen);
    if (alen != NULL)
        *alen = 0; /* a connected stream socket reports no address */
    return real_recvfrom(fd, buf, clamp(fd, n), flags, NULL, NULL);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                              struct sockaddr *addr, socklen_t *alen)
{
    if (real_recvfrom_chk == NULL)
        real_recvfrom_chk = (ssize_t (*)(int, void *, size_t, size_t, int, struct sockaddr *,
                                         socklen_t *))dlsym(RTLD_NEXT, "__recvfrom_chk");
    if (slot_get(fd) == NULL)
        return real_recvfrom_chk(fd, buf, n, buflen, flags, addr, alen);
    if (alen != NULL)
        *alen = 0;
    return real_recvfrom_chk(fd, buf, clamp(fd, n), buflen, flags, NULL, NULL);
}

/* An iovec array cut to MAX_DELIVERY bytes in total; returns the new count. */
static int cut_iov(const struct iovec *in, int count, struct iovec *out)
{
    size_t left = MAX_DELIVERY;
    int i;
    for (i = 0; i < count && left > 0; i++) {
        out[i] = in[i];
        if (out[i].iov_len > left)
            out[i].iov_len = left;
        left -= out[i].iov_len;
    }
    return i == 0 && count > 0 ? 1 : i; /* keep one (possibly empty) element */
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int count)
{
    RESOLVE(readv);
    if (slot_get(fd) == NULL || count <= 0 || count > IOV_MAX)
        return real_readv(fd, iov, count);
    struct iovec cut[IOV_MAX];
    int n = cut_iov(iov, count, cut);
    return real_readv(fd, cut, n);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    RESOLVE(recvmsg);
    if (slot_get(fd) == NULL || msg == NULL || msg->msg_iovlen == 0 ||
        msg->msg_iovlen > IOV_MAX)
        return real_recvmsg(fd, msg, flags);
    struct iovec cut[IOV_MAX];
    struct iovec *saved_iov = msg->msg_iov;
    size_t saved_len = msg->msg_iovlen;
    msg->msg_iovlen = (size_t)cut_iov(saved_iov, (int)saved_len, cut);
    msg->msg_iov = cut;
    /* A connected vsock stream socket reports no sender address (the Unix socket would
     * report the companion's name). */
    void *saved_name = msg->msg_name;
    msg->msg_name = NULL;
    ssize_t r = real_recvmsg(fd, msg, flags);
    int e = errno;
    msg->msg_iov = saved_iov;
    msg->msg_iovlen = saved_len;
    msg->msg_name = saved_name;
    msg->msg_namelen = 0;
    errno = e;
    return r;
}

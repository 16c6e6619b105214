/*
 * An ordinary Linux AF_VSOCK program, written against <linux/vm_sockets.h> only, run in a VM
 * by tests/integration/test_run_shim.py through `hvsock run` (compiled there with gcc).
 *
 *   vsock_prog ECHO_PORT LISTEN_PORT MISSING_PORT
 *
 * The host partition serves an echo on ECHO_PORT and connects to LISTEN_PORT once this
 * program prints "LISTENING". Each check prints "ok <name>" or "FAIL <name>: <why>" and the
 * program exits 1 at the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#define CHECK(name, cond, ...)                                                               \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            printf("FAIL %s: ", name);                                                       \
            printf(__VA_ARGS__);                                                             \
            printf(" (errno %d %s)\n", errno, strerror(errno));                              \
            fflush(stdout);                                                                  \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)
#define OK(name)                                                                             \
    do {                                                                                     \
        printf("ok %s\n", name);                                                             \
        fflush(stdout);                                                                      \
    } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_vm vm_addr(unsigned cid, unsigned port)
{
    struct sockaddr_vm a;
    memset(&a, 0, sizeof(a));
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

/* Non-blocking connect + poll + SO_ERROR; returns the fd (non-blocking) or -errno. */
static int nb_connect(unsigned cid, unsigned port, int timeout_ms)
{
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK, 0);
    CHECK("socket", s >= 0, "socket(AF_VSOCK)");
    if (timeout_ms > 0) {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        CHECK("connect-timeout-set",
              setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv)) == 0,
              "setsockopt");
        struct timeval got;
        socklen_t len = sizeof(got);
        CHECK("connect-timeout-get",
              getsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &got, &len) == 0 &&
                  got.tv_sec == tv.tv_sec && got.tv_usec == tv.tv_usec,
              "getsockopt gave %ld.%06ld", (long)got.tv_sec, (long)got.tv_usec);
    }
    struct sockaddr_vm a = vm_addr(cid, port);
    int rc = connect(s, (struct sockaddr *)&a, sizeof(a));
    if (rc < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(s);
        return -e;
    }
    if (rc < 0) {
        /* Writable only once the connect has finished, not at once. */
        struct pollfd p = {s, POLLOUT, 0};
        CHECK("poll-not-early", poll(&p, 1, 0) == 0 || timeout_ms == 0, "POLLOUT at once");
        rc = connect(s, (struct sockaddr *)&a, sizeof(a));
        CHECK("connect-again", rc < 0 && (errno == EALREADY || errno == EISCONN),
              "second connect while connecting");
        CHECK("poll", poll(&p, 1, 10000) == 1, "poll timed out");
        int err = -1;
        socklen_t len = sizeof(err);
        CHECK("so-error", getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0, "SO_ERROR");
        if (err != 0) {
            close(s);
            return -err;
        }
    }
    return s;
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EAGAIN) {
            struct pollfd pf = {fd, POLLOUT, 0};
            poll(&pf, 1, 10000);
            continue;
        }
        CHECK("write", w > 0, "write");
        p += w;
        n -= (size_t)w;
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 4) {
        fprintf(stderr, "usage: %s ECHO_PORT LISTEN_PORT MISSING_PORT\n", argv[0]);
        return 2;
    }
    unsigned echo_port = (unsigned)atoi(argv[1]);
    unsigned listen_port = (unsigned)atoi(argv[2]);
    unsigned missing_port = (unsigned)atoi(argv[3]);

    /* 1. Non-blocking connect, addresses. */
    int s = nb_connect(VMADDR_CID_HOST, echo_port, 0);
    CHECK("nonblocking-connect", s >= 0, "connect failed: %s", strerror(-s));
    struct sockaddr_vm a;
    socklen_t len = sizeof(a);
    CHECK("getpeername", getpeername(s, (struct sockaddr *)&a, &len) == 0 &&
                             len == sizeof(a) && a.svm_family == AF_VSOCK &&
                             a.svm_cid == VMADDR_CID_HOST && a.svm_port == echo_port,
          "peer %u:%u", a.svm_cid, a.svm_port);
    len = sizeof(a);
    CHECK("getsockname", getsockname(s, (struct sockaddr *)&a, &len) == 0 &&
                             a.svm_family == AF_VSOCK && a.svm_cid == VMADDR_CID_ANY &&
                             a.svm_port != VMADDR_PORT_ANY,
          "local %u:%u", a.svm_cid, a.svm_port);
    int domain = 0;
    len = sizeof(domain);
    CHECK("so-domain", getsockopt(s, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
                           domain == AF_VSOCK, "SO_DOMAIN %d", domain);
    OK("nonblocking-connect");

    /* 2. epoll, edge-triggered: 200 KB out, the echo back; no read over 16 KiB. */
    enum { TOTAL = 200000 };
    static char out[TOTAL], in[TOTAL];
    for (int i = 0; i < TOTAL; i++)
        out[i] = (char)(i * 7 + 3);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.fd = s};
    CHECK("epoll-add", epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev) == 0, "epoll_ctl");
    size_t sent = 0, got = 0;
    ssize_t biggest = 0;
    while (got < TOTAL) {
        if (sent < TOTAL) {
            ssize_t w = send(s, out + sent, TOTAL - sent, MSG_DONTWAIT);
            if (w > 0)
                sent += (size_t)w;
        }
        struct epoll_event events[4];
        int n = epoll_wait(ep, events, 4, sent < TOTAL ? 10 : 5000);
        CHECK("epoll-wait", n >= 0, "epoll_wait");
        if (n == 0 && sent == TOTAL)
            CHECK("epoll-echo", 0, "no event with %zu of %d echoed", got, TOTAL);
        while (got < TOTAL) { /* edge-triggered: read until EAGAIN */
            ssize_t r = read(s, in + got, TOTAL - got);
            if (r < 0 && errno == EAGAIN)
                break;
            CHECK("epoll-read", r > 0, "read returned %zd", r);
            if (r > biggest)
                biggest = r;
            got += (size_t)r;
        }
    }
    CHECK("epoll-echo", memcmp(in, out, TOTAL) == 0, "echo differs");
    CHECK("delivery-16k", biggest <= 16384, "a read returned %zd bytes", biggest);
    OK("epoll-edge-triggered");

    /* 3. dup: the copy works, closing it keeps the original. */
    int d = dup(s);
    CHECK("dup", d >= 0, "dup");
    len = sizeof(a);
    CHECK("dup-peer", getpeername(d, (struct sockaddr *)&a, &len) == 0 &&
                          a.svm_port == echo_port, "dup'd peer");
    close(d);
    int d2 = fcntl(s, F_DUPFD_CLOEXEC, 100);
    CHECK("fcntl-dupfd", d2 >= 100, "F_DUPFD_CLOEXEC");
    close(s);
    s = d2; /* the original closed: the copy carries on */
    OK("dup");

    /* 4. fork after connect: the child writes, the parent reads the echo. */
    int fl = fcntl(s, F_GETFL);
    fcntl(s, F_SETFL, fl & ~O_NONBLOCK);
    pid_t child = fork();
    if (child == 0) {
        write_all(s, "from the child", 14);
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    CHECK("fork-child", WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status");
    char buf[64];
    size_t n = 0;
    while (n < 14) {
        ssize_t r = read(s, buf + n, 14 - n);
        CHECK("fork-read", r > 0, "read");
        n += (size_t)r;
    }
    CHECK("fork-echo", memcmp(buf, "from the child", 14) == 0, "echo");
    /* Half-close: the echo ends its stream after ours. */
    CHECK("shutdown", shutdown(s, SHUT_WR) == 0, "shutdown");
    ssize_t r = read(s, buf, sizeof(buf));
    CHECK("eof", r == 0, "read after half-close returned %zd", r);
    close(s);
    OK("fork");

    /* 5. Connect timeout: nobody listens on MISSING_PORT; the linux personality times out. */
    double t0 = now();
    int e = nb_connect(VMADDR_CID_HOST, missing_port, 300);
    double took = now() - t0;
    CHECK("timeout", e == -ETIMEDOUT, "got %s", e < 0 ? strerror(-e) : "a connection");
    CHECK("timeout-time", took > 0.25 && took < 2.0, "took %.3f s", took);
    OK("connect-timeout");

    /* 6. Only the host is reachable. */
    s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm other = vm_addr(3, echo_port);
    CHECK("unreachable", connect(s, (struct sockaddr *)&other, sizeof(other)) < 0 &&
                             errno == ENETUNREACH, "connect to CID 3");
    close(s);
    OK("enetunreach");

    /* 7. A TCP socket next to them is the kernel's. */
    int t = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in in4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK("tcp", bind(t, (struct sockaddr *)&in4, sizeof(in4)) == 0 && listen(t, 1) == 0,
          "tcp listen");
    len = sizeof(in4);
    CHECK("tcp-name", getsockname(t, (struct sockaddr *)&in4, &len) == 0 &&
                          in4.sin_family == AF_INET && in4.sin_port != 0, "tcp getsockname");
    int tc = socket(AF_INET, SOCK_STREAM, 0);
    CHECK("tcp-connect", connect(tc, (struct sockaddr *)&in4, sizeof(in4)) == 0, "connect");
    int ta = accept(t, NULL, NULL);
    write_all(tc, "tcp!", 4);
    CHECK("tcp-read", read(ta, buf, 4) == 4 && memcmp(buf, "tcp!", 4) == 0, "tcp data");
    close(ta);
    close(tc);
    close(t);
    OK("tcp-untouched");

    /* 8. Listen; the host connects; accept4 with flags. */
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm la = vm_addr(VMADDR_CID_ANY, listen_port);
    CHECK("bind", bind(l, (struct sockaddr *)&la, sizeof(la)) == 0, "bind");
    CHECK("listen", listen(l, 4) == 0, "listen");
    len = sizeof(a);
    CHECK("listen-name", getsockname(l, (struct sockaddr *)&a, &len) == 0 &&
                             a.svm_port == listen_port, "listener name");
    fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK);
    CHECK("accept-eagain", accept4(l, NULL, NULL, 0) < 0 && errno == EAGAIN, "accept");
    printf("LISTENING %u\n", listen_port);
    fflush(stdout);
    struct pollfd p = {l, POLLIN, 0};
    CHECK("accept-poll", poll(&p, 1, 10000) == 1, "no connection");
    len = sizeof(a);
    int c = accept4(l, (struct sockaddr *)&a, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    CHECK("accept4", c >= 0, "accept4");
    CHECK("accept4-flags", (fcntl(c, F_GETFL) & O_NONBLOCK) && (fcntl(c, F_GETFD) & FD_CLOEXEC),
          "flags");
    CHECK("accept4-peer", len == sizeof(a) && a.svm_family == AF_VSOCK &&
                              a.svm_cid == VMADDR_CID_HOST, "peer %u:%u", a.svm_cid,
          a.svm_port);
    unsigned peer_port = a.svm_port;
    len = sizeof(a);
    CHECK("accepted-peer", getpeername(c, (struct sockaddr *)&a, &len) == 0 &&
                               a.svm_port == peer_port, "getpeername");
    len = sizeof(a);
    CHECK("accepted-name", getsockname(c, (struct sockaddr *)&a, &len) == 0 &&
                               a.svm_port == listen_port, "getsockname %u", a.svm_port);
    p.fd = c;
    CHECK("accepted-poll", poll(&p, 1, 10000) == 1, "no data");
    r = recv(c, buf, sizeof(buf), 0);
    CHECK("accepted-read", r == 5 && memcmp(buf, "hello", 5) == 0, "read %zd", r);
    write_all(c, "olleh", 5);
    close(c);
    close(l);
    OK("accept4");
    printf("DONE\n");
    return 0;
}

/*
 * uring-cat: opens and reads files through io_uring only (IORING_OP_OPENAT, IORING_OP_READ,
 * IORING_OP_CLOSE; no open, read or close syscall), as the "curing" rootkit does to slip past
 * syscall hooks. Prints how many bytes it read from each file, never the bytes.
 *
 *   uring-cat [--sqpoll] FILE|tcp:IPV4:PORT|unix:PATH|rename:OLD:NEW|link:OLD:NEW|symlink:TARGET:LINK...
 *
 * tcp:... and unix:... connect a new socket (socket(2)) with IORING_OP_CONNECT instead: no
 * connect syscall. rename:, link: and symlink: are IORING_OP_RENAMEAT, LINKAT and SYMLINKAT.
 *
 * --sqpoll sets the ring up with IORING_SETUP_SQPOLL: a kernel thread submits the requests, so
 * the process makes no syscall for them at all. Exits 1 when a file could not be opened or read.
 * Built by tests/tests/io_uring.rs with `cc ... -luring` (Debian's liburing-dev).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int run(struct io_uring *ring, struct io_uring_sqe *sqe) {
    struct io_uring_cqe *cqe;
    (void)sqe;
    int rc = io_uring_submit(ring);
    if (rc < 0)
        return rc;
    rc = io_uring_wait_cqe(ring, &cqe);
    if (rc < 0)
        return rc;
    rc = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    return rc;
}

/* Connects to tcp:IPV4:PORT or unix:PATH through the ring; 0 on success. */
static int connect_to(struct io_uring *ring, const char *target) {
    struct sockaddr_storage addr;
    socklen_t len;
    memset(&addr, 0, sizeof addr);
    if (strncmp(target, "tcp:", 4) == 0) {
        struct sockaddr_in *in = (struct sockaddr_in *)&addr;
        char host[64];
        const char *colon = strrchr(target + 4, ':');
        if (!colon || (size_t)(colon - target - 4) >= sizeof host)
            return -1;
        memcpy(host, target + 4, colon - target - 4);
        host[colon - target - 4] = 0;
        in->sin_family = AF_INET;
        in->sin_port = htons(atoi(colon + 1));
        if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
            return -1;
        len = sizeof *in;
    } else {
        struct sockaddr_un *un = (struct sockaddr_un *)&addr;
        un->sun_family = AF_UNIX;
        strncpy(un->sun_path, target + 5, sizeof un->sun_path - 1);
        len = sizeof *un;
    }
    int fd = socket(addr.ss_family, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_connect(sqe, fd, (struct sockaddr *)&addr, len);
    int rc = run(ring, sqe);
    if (rc < 0)
        fprintf(stderr, "%s: connect: %s\n", target, strerror(-rc));
    else
        printf("%s: connected\n", target);
    close(fd);
    return rc;
}

/* rename:OLD:NEW, link:OLD:NEW or symlink:TARGET:LINK through the ring; 0 on success. */
static int two_paths(struct io_uring *ring, const char *arg) {
    char buf[1024];
    strncpy(buf, strchr(arg, ':') + 1, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    char *second = strchr(buf, ':');
    if (!second)
        return -1;
    *second++ = 0;
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (strncmp(arg, "rename:", 7) == 0)
        io_uring_prep_renameat(sqe, AT_FDCWD, buf, AT_FDCWD, second, 0);
    else if (strncmp(arg, "link:", 5) == 0)
        io_uring_prep_linkat(sqe, AT_FDCWD, buf, AT_FDCWD, second, 0);
    else
        io_uring_prep_symlinkat(sqe, buf, AT_FDCWD, second);
    int rc = run(ring, sqe);
    if (rc < 0)
        fprintf(stderr, "%s: %s\n", arg, strerror(-rc));
    return rc;
}

int main(int argc, char **argv) {
    struct io_uring ring;
    unsigned flags = 0;
    int first = 1, failed = 0;
    if (argc > 1 && strcmp(argv[1], "--sqpoll") == 0) {
        flags |= IORING_SETUP_SQPOLL;
        first = 2;
    }
    int rc = io_uring_queue_init(8, &ring, flags);
    if (rc < 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-rc));
        return 2;
    }
    for (int i = first; i < argc; i++) {
        static char buf[4096];
        if (strncmp(argv[i], "tcp:", 4) == 0 || strncmp(argv[i], "unix:", 5) == 0) {
            if (connect_to(&ring, argv[i]) < 0)
                failed = 1;
            continue;
        }
        if (strncmp(argv[i], "rename:", 7) == 0 || strncmp(argv[i], "link:", 5) == 0 ||
            strncmp(argv[i], "symlink:", 8) == 0) {
            if (two_paths(&ring, argv[i]) < 0)
                failed = 1;
            continue;
        }
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        io_uring_prep_openat(sqe, AT_FDCWD, argv[i], O_RDONLY, 0);
        int fd = run(&ring, sqe);
        if (fd < 0) {
            fprintf(stderr, "%s: open: %s\n", argv[i], strerror(-fd));
            failed = 1;
            continue;
        }
        sqe = io_uring_get_sqe(&ring);
        io_uring_prep_read(sqe, fd, buf, sizeof buf, 0);
        int n = run(&ring, sqe);
        sqe = io_uring_get_sqe(&ring);
        io_uring_prep_close(sqe, fd);
        run(&ring, sqe);
        if (n <= 0) {
            fprintf(stderr, "%s: read: %s\n", argv[i], n < 0 ? strerror(-n) : "empty");
            failed = 1;
            continue;
        }
        printf("%s: %d bytes\n", argv[i], n);
    }
    io_uring_queue_exit(&ring);
    return failed;
}

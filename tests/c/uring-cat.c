/*
 * uring-cat: opens and reads files through io_uring only (IORING_OP_OPENAT, IORING_OP_READ,
 * IORING_OP_CLOSE; no open, read or close syscall), as the "curing" rootkit does to slip past
 * syscall hooks. Prints how many bytes it read from each file, never the bytes.
 *
 *   uring-cat [--sqpoll] FILE...
 *
 * --sqpoll sets the ring up with IORING_SETUP_SQPOLL: a kernel thread submits the requests, so
 * the process makes no syscall for them at all. Exits 1 when a file could not be opened or read.
 * Built by tests/tests/io_uring.rs with `cc ... -luring` (Debian's liburing-dev).
 */
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <string.h>

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

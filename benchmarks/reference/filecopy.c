/*
 * Reference for the data-path benchmark: the least work a verified file-to-file copy over
 * loopback TCP can do on this host, with nothing of the agent around it.
 *
 *   filecopy SRC DST STREAMS CHUNK_BYTES
 *
 * A child process listens on 127.0.0.1; STREAMS sender threads each take the next chunk, pread it,
 * xxh3-64 it and send (16-byte header: index, hash) + chunk; STREAMS receiver threads recv, check
 * the hash and pwrite at the chunk's offset into DST (created and sized first, like the agent's
 * temporary file). Prints the throughput in bytes per second. No journal, no ACKs, no HDE: iperf3
 * measures the socket alone, this measures socket + the two file copies any migration must make,
 * so the agent's figure can be read against both.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

static long chunk, chunks, size;
static int src_fd, dst_fd, port;
static atomic_long next_chunk;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void send_all(int sock, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t sent = sendmsg(sock, &msg, 0);
        if (sent <= 0) die("sendmsg");
        while (n > 0 && sent >= (ssize_t)iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
}

static void *sender(void *unused) {
    (void)unused;
    int sock = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr)) die("connect");
    char *buf = aligned_alloc(4096, (size_t)chunk);
    for (;;) {
        long index = atomic_fetch_add(&next_chunk, 1);
        if (index >= chunks) break;
        long len = (index + 1) * chunk <= size ? chunk : size - index * chunk;
        if (pread(src_fd, buf, (size_t)len, index * chunk) != len) die("pread");
        uint64_t header[2] = {(uint64_t)index, XXH3_64bits(buf, (size_t)len)};
        struct iovec iov[2] = {{header, sizeof header}, {buf, (size_t)len}};
        send_all(sock, iov, 2);
    }
    close(sock);
    free(buf);
    return NULL;
}

static int recv_all(int sock, char *buf, long len) {
    long got = 0;
    while (got < len) {
        ssize_t n = recv(sock, buf + got, (size_t)(len - got), 0);
        if (n == 0 && got == 0) return 0;
        if (n <= 0) die("recv");
        got += n;
    }
    return 1;
}

static void *receiver(void *arg) {
    int sock = (int)(intptr_t)arg;
    char *buf = aligned_alloc(4096, (size_t)chunk);
    uint64_t header[2];
    while (recv_all(sock, (char *)header, sizeof header)) {
        long index = (long)header[0];
        if (index < 0 || index >= chunks) die("bad chunk index");
        long len = (index + 1) * chunk <= size ? chunk : size - index * chunk;
        recv_all(sock, buf, len);
        if (XXH3_64bits(buf, (size_t)len) != header[1]) die("checksum mismatch");
        if (pwrite(dst_fd, buf, (size_t)len, index * chunk) != len) die("pwrite");
    }
    close(sock);
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SRC DST STREAMS CHUNK_BYTES\n", argv[0]);
        return 2;
    }
    int streams = atoi(argv[3]);
    chunk = atol(argv[4]);
    if (streams < 1 || streams > 64 || chunk < 4096) return 2;
    if ((src_fd = open(argv[1], O_RDONLY)) < 0) die(argv[1]);
    size = lseek(src_fd, 0, SEEK_END);
    chunks = (size + chunk - 1) / chunk;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t addr_len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 64) ||
        getsockname(listener, (struct sockaddr *)&addr, &addr_len))
        die("listen");
    port = ntohs(addr.sin_port);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t child = fork();
    if (child < 0) die("fork");
    pthread_t threads[64];
    if (child == 0) {
        if ((dst_fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600)) < 0 || ftruncate(dst_fd, size)) die(argv[2]);
        for (int i = 0; i < streams; i++) {
            int sock = accept(listener, NULL, NULL);
            if (sock < 0) die("accept");
            pthread_create(&threads[i], NULL, receiver, (void *)(intptr_t)sock);
        }
        for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
        _exit(0);
    }
    for (int i = 0; i < streams; i++) pthread_create(&threads[i], NULL, sender, NULL);
    for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
    int status;
    if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "receiver failed\n");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.0f\n", (double)size / seconds);
    return 0;
}

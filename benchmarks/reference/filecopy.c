/*
 * Reference for the data-path benchmark: the least work a verified file-to-file copy over
 * loopback TCP can do on this host, with nothing of the agent around it.
 *
 *   filecopy [--seal] [--reserve] [--pin SEND_CPU,RECV_CPU] SRC DST STREAMS CHUNK_BYTES
 *
 * A child process listens on 127.0.0.1; STREAMS sender threads each take the next chunk, pread it,
 * xxh3-64 it and send (16-byte header: index, hash) + chunk; STREAMS receiver threads recv, check
 * the hash and pwrite at the chunk's offset into DST (created and sized first, like the agent's
 * temporary file). Prints the throughput in bytes per second. No journal, no ACKs, no HDE: iperf3
 * measures the socket alone, this measures socket + the two file copies any migration must make,
 * so the agent's figure can be read against both.
 *
 * The options add the agent's default guarantees, so its encrypted rows have a like-for-like
 * reference too:
 *   --seal     each chunk travels AES-128-GCM sealed, with the library the agent uses (intel-ipsec-mb,
 *              native/stream.pyx): one key per stream (a per-run random master key, which the
 *              receiver inherits through fork, XOR the stream's number, sent first on the stream),
 *              nonce = 96-bit little-endian counter from 1, the 16-byte header as associated data,
 *              sealed and opened in 128 KiB pieces like the agent; the receiver checks the tag (a
 *              mismatch is a hard error) and the xxh3 before it writes.
 *   --reserve  posix_fallocate(DST, 0, size) before the receivers accept, as the agent's destination
 *              reserves the image's space before it answers Start.
 *
 * For a per-side reference (bench_pipeline measures each side of the agent alone on one core):
 *   --pin S,R  the sending process runs on CPU S and the receiving one on CPU R, and the output line
 *              gains each side's CPU seconds (user + system): "BYTES_PER_S SEND_CPU_S RECV_CPU_S".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <intel-ipsec-mb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

static long chunk, chunks, size;
static int src_fd, dst_fd, port;
static atomic_long next_chunk;
static atomic_long next_stream;
static int seal, reserve;
static int send_cpu = -1, recv_cpu = -1;
static uint8_t master_key[16];
static IMB_MGR *mb;

enum { TAG_BYTES = 16, PIECE = 128 * 1024 };

/* One stream's AES-128-GCM state: expanded key, context, nonce counter (as sealed.FrameKey). */
struct cipher {
    struct gcm_key_data key __attribute__((aligned(64)));
    struct gcm_context_data ctx __attribute__((aligned(64)));
    uint64_t counter;
};

static void cipher_init(struct cipher *c, uint64_t stream) {
    uint8_t key[16];
    memcpy(key, master_key, sizeof key);
    for (int i = 0; i < 8; i++) key[i] ^= (uint8_t)(stream >> (8 * i));
    IMB_AES128_GCM_PRE(mb, key, &c->key);
    c->counter = 0;
}

static void cipher_begin(struct cipher *c, const void *aad, uint64_t aad_len) {
    uint8_t iv[12] = {0};
    c->counter++;
    for (int i = 0; i < 8; i++) iv[i] = (uint8_t)(c->counter >> (8 * i));
    IMB_AES128_GCM_INIT(mb, &c->key, &c->ctx, iv, aad, aad_len);
}

/* Seal (encrypt = 1) or open `buf` in place in PIECE-sized steps, as the agent does, and write the tag. */
static void cipher_run(struct cipher *c, int encrypt, const void *aad, uint64_t aad_len, void *buf, long len,
                       uint8_t *tag) {
    cipher_begin(c, aad, aad_len);
    for (long at = 0; at < len; at += PIECE) {
        uint8_t *piece = (uint8_t *)buf + at;
        uint64_t n = (uint64_t)(len - at < PIECE ? len - at : PIECE);
        if (encrypt)
            IMB_AES128_GCM_ENC_UPDATE(mb, &c->key, &c->ctx, piece, piece, n);
        else
            IMB_AES128_GCM_DEC_UPDATE(mb, &c->key, &c->ctx, piece, piece, n);
    }
    if (encrypt)
        IMB_AES128_GCM_ENC_FINALIZE(mb, &c->key, &c->ctx, tag, TAG_BYTES);
    else
        IMB_AES128_GCM_DEC_FINALIZE(mb, &c->key, &c->ctx, tag, TAG_BYTES);
}

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
    static _Thread_local struct cipher cipher;
    if (seal) {
        uint64_t stream = (uint64_t)atomic_fetch_add(&next_stream, 1);
        cipher_init(&cipher, stream);
        struct iovec hello = {&stream, sizeof stream};
        send_all(sock, &hello, 1);
    }
    for (;;) {
        long index = atomic_fetch_add(&next_chunk, 1);
        if (index >= chunks) break;
        long len = (index + 1) * chunk <= size ? chunk : size - index * chunk;
        if (pread(src_fd, buf, (size_t)len, index * chunk) != len) die("pread");
        uint64_t header[2] = {(uint64_t)index, XXH3_64bits(buf, (size_t)len)};
        uint8_t tag[TAG_BYTES];
        if (seal) {
            cipher_run(&cipher, 1, header, sizeof header, buf, len, tag);
        }
        struct iovec iov[3] = {{header, sizeof header}, {buf, (size_t)len}, {tag, TAG_BYTES}};
        send_all(sock, iov, seal ? 3 : 2);
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
    static _Thread_local struct cipher cipher;
    if (seal) {
        uint64_t stream;
        if (!recv_all(sock, (char *)&stream, sizeof stream)) {
            fprintf(stderr, "stream closed before its number\n");
            exit(1);
        }
        cipher_init(&cipher, stream);
    }
    while (recv_all(sock, (char *)header, sizeof header)) {
        long index = (long)header[0];
        if (index < 0 || index >= chunks) die("bad chunk index");
        long len = (index + 1) * chunk <= size ? chunk : size - index * chunk;
        recv_all(sock, buf, len);
        if (seal) {
            uint8_t tag[TAG_BYTES], computed[TAG_BYTES], diff = 0;
            recv_all(sock, (char *)tag, TAG_BYTES);
            cipher_run(&cipher, 0, header, sizeof header, buf, len, computed);
            for (int i = 0; i < TAG_BYTES; i++) diff |= computed[i] ^ tag[i];
            if (diff) {
                fprintf(stderr, "chunk %ld: AES-GCM tag mismatch\n", index);
                exit(1);
            }
        }
        if (XXH3_64bits(buf, (size_t)len) != header[1]) die("checksum mismatch");
        if (pwrite(dst_fd, buf, (size_t)len, index * chunk) != len) die("pwrite");
    }
    close(sock);
    free(buf);
    return NULL;
}

/* Run this process (and the threads it starts after) on one CPU; -1 leaves it where it is. */
static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity");
}

static double cpu_seconds(const struct rusage *usage) {
    return (double)usage->ru_utime.tv_sec + (double)usage->ru_utime.tv_usec / 1e6 +
           (double)usage->ru_stime.tv_sec + (double)usage->ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    char *args[4];
    int positional = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seal")) seal = 1;
        else if (!strcmp(argv[i], "--reserve")) reserve = 1;
        else if (!strcmp(argv[i], "--pin") && i + 1 < argc && sscanf(argv[i + 1], "%d,%d", &send_cpu, &recv_cpu) == 2) i++;
        else if (positional < 4 && strncmp(argv[i], "--", 2)) args[positional++] = argv[i];
        else positional = 5;
    }
    if (positional != 4) {
        fprintf(stderr, "usage: %s [--seal] [--reserve] [--pin SEND_CPU,RECV_CPU] SRC DST STREAMS CHUNK_BYTES\n", argv[0]);
        return 2;
    }
    if (seal) {
        if ((mb = alloc_mb_mgr(0)) == NULL) die("alloc_mb_mgr");
        init_mb_mgr_auto(mb, NULL);
        if (getrandom(master_key, sizeof master_key, 0) != sizeof master_key) die("getrandom");
    }
    int streams = atoi(args[2]);
    chunk = atol(args[3]);
    if (streams < 1 || streams > 64 || chunk < 4096) return 2;
    if ((src_fd = open(args[0], O_RDONLY)) < 0) die(args[0]);
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
        pin(recv_cpu);
        if ((dst_fd = open(args[1], O_RDWR | O_CREAT | O_TRUNC, 0600)) < 0 || ftruncate(dst_fd, size)) die(args[1]);
        int rc = reserve ? posix_fallocate(dst_fd, 0, size) : 0;
        if (rc) {
            fprintf(stderr, "posix_fallocate: %s\n", strerror(rc));
            _exit(1);
        }
        for (int i = 0; i < streams; i++) {
            int sock = accept(listener, NULL, NULL);
            if (sock < 0) die("accept");
            pthread_create(&threads[i], NULL, receiver, (void *)(intptr_t)sock);
        }
        for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
        _exit(0);
    }
    pin(send_cpu);
    for (int i = 0; i < streams; i++) pthread_create(&threads[i], NULL, sender, NULL);
    for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
    int status;
    if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
        fprintf(stderr, "receiver failed\n");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (send_cpu < 0) {
        printf("%.0f\n", (double)size / seconds);
        return 0;
    }
    struct rusage self, children;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &children);
    printf("%.0f %.6f %.6f\n", (double)size / seconds, cpu_seconds(&self), cpu_seconds(&children));
    return 0;
}

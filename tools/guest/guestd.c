/* Test-guest workload: a heartbeat on the console and, optionally, memory dirtied at a set rate.
 *
 * Runs as the guest's only program (exec'd by the initramfs /init). Every 100 ms it prints
 *   HB <seq> <boot_id> <uptime_ms>
 * so the host can see that the guest kept running across a live migration: the sequence goes on
 * without restarting (same boot id) and the gap between two beats bounds the downtime.
 * With `dirty_mbps` > 0 it rewrites `dirty_mb` MiB of non-zero, non-repeating data at that rate,
 * so pre-copy has real work that neither zero-page detection nor a repeated pattern removes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PAGE 4096
#define TICK_MS 10
#define BEAT_MS 100

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next_random(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(uint64_t ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void read_boot_id(char *out, size_t len) {
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f == NULL || fgets(out, (int)len, f) == NULL) {
        snprintf(out, len, "unknown");
    }
    if (f != NULL) fclose(f);
    out[strcspn(out, "\n")] = 0;
}

int main(int argc, char **argv) {
    long dirty_mbps = argc > 1 ? atol(argv[1]) : 0;
    long dirty_mb = argc > 2 ? atol(argv[2]) : 0;
    char boot_id[64];
    read_boot_id(boot_id, sizeof boot_id);
    rng ^= (uint64_t)now_ms() * 0x100000001b3ULL;

    size_t pages = dirty_mbps > 0 && dirty_mb > 0 ? (size_t)dirty_mb * 256 : 0;
    uint64_t *area = NULL;
    if (pages > 0) {
        area = malloc(pages * PAGE);
        if (area == NULL) {
            printf("DIRTY alloc-failed %ld MiB\n", dirty_mb);
            pages = 0;
        } else {
            for (size_t i = 0; i < pages * PAGE / 8; i++) area[i] = next_random();
        }
    }
    /* Pages to rewrite per tick; each rewrite changes 512 bytes spread over the page. */
    double per_tick = (double)dirty_mbps * 256.0 * TICK_MS / 1000.0;
    double owed = 0;
    size_t cursor = 0;
    printf("GUEST ready boot_id=%s dirty_mbps=%ld dirty_mb=%ld\n", boot_id, dirty_mbps, dirty_mb);
    fflush(stdout);

    uint64_t seq = 0;
    uint64_t next_beat = now_ms();
    for (;;) {
        uint64_t t = now_ms();
        if (t >= next_beat) {
            printf("HB %llu %s %llu\n", (unsigned long long)seq++, boot_id, (unsigned long long)t);
            fflush(stdout);
            next_beat += BEAT_MS;
            if (next_beat + BEAT_MS < t) next_beat = t + BEAT_MS; /* after a pause: no burst */
        }
        if (pages > 0) {
            owed += per_tick;
            while (owed >= 1.0) {
                uint64_t *page = area + cursor * (PAGE / 8);
                for (int w = 0; w < PAGE / 8; w += 8) page[w] = next_random();
                cursor = (cursor + 1) % pages;
                owed -= 1.0;
            }
        }
        sleep_ms(TICK_MS);
    }
}

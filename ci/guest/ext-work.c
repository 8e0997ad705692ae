/*
 * ext-work: the L2 guest workload of the lab scenarios snapshot-restore and snapshot-size.
 *
 *   ext-work <MiB> <seed> [<tick ms>]
 *
 * Fills <MiB> MiB of anonymous memory with a pattern derived from <seed>, then every tick
 * rewrites one 64 KiB slice (the state evolves, so a restore must bring back the latest
 * memory, not an old one), folds the slice into a running checksum, re-reads the whole buffer
 * and compares its sum with a sum kept incrementally, and prints
 *
 *   EXT-WORK <n> <checksum> ok      (or "BAD <expected> <found>" when memory was lost)
 *
 * <n> and <checksum> depend only on <seed> and <n>, so two runs restored from one snapshot
 * print identical lines. SIGUSR1 frees the second half of the buffer (munmap; with the
 * kernel's init_on_free=1 the freed pages become zero) and prints EXT-WORK-FREED <MiB>.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define SLICE_WORDS (64 * 1024 / 8)

static volatile sig_atomic_t free_requested;

static void on_usr1(int sig)
{
    (void)sig;
    free_requested = 1;
}

static uint64_t mix(uint64_t x)
{
    /* splitmix64's finalizer */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: ext-work <MiB> <seed> [<tick ms>]\n");
        return 2;
    }
    size_t mib = strtoul(argv[1], NULL, 10);
    uint64_t seed = strtoull(argv[2], NULL, 10);
    long tick_ms = argc > 3 ? strtol(argv[3], NULL, 10) : 500;
    if (mib == 0 || tick_ms <= 0) {
        fprintf(stderr, "ext-work: bad arguments\n");
        return 2;
    }
    size_t bytes = mib << 20;
    size_t words = bytes / 8;
    uint64_t *buf = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("ext-work: mmap");
        return 1;
    }
    signal(SIGUSR1, on_usr1);

    uint64_t sum = 0;
    for (size_t i = 0; i < words; i++) {
        buf[i] = mix(seed ^ i);
        sum += buf[i];
    }
    printf("EXT-WORK-READY mib=%zu seed=%llu\n", mib, (unsigned long long)seed);
    fflush(stdout);

    uint64_t checksum = seed;
    struct timespec tick = { tick_ms / 1000, (tick_ms % 1000) * 1000000L };
    for (uint64_t n = 1;; n++) {
        if (free_requested) {
            free_requested = 0;
            size_t keep = (words / 2) & ~(size_t)(4096 / 8 - 1);
            for (size_t i = keep; i < words; i++)
                sum -= buf[i];
            if (munmap(buf + keep, (words - keep) * 8) != 0) {
                perror("ext-work: munmap");
                return 1;
            }
            printf("EXT-WORK-FREED %zu\n", (words - keep) * 8 >> 20);
            words = keep;
        }
        size_t slices = words / SLICE_WORDS;
        size_t first = (size_t)(n % slices) * SLICE_WORDS;
        uint64_t slice_sum = 0;
        for (size_t i = first; i < first + SLICE_WORDS; i++) {
            uint64_t next = mix(buf[i] ^ n);
            sum += next - buf[i];
            buf[i] = next;
            slice_sum += next;
        }
        checksum = mix(checksum ^ slice_sum);
        uint64_t found = 0;
        for (size_t i = 0; i < words; i++)
            found += buf[i];
        if (found == sum)
            printf("EXT-WORK %llu %016llx ok\n", (unsigned long long)n,
                   (unsigned long long)checksum);
        else
            printf("EXT-WORK %llu %016llx BAD %016llx %016llx\n", (unsigned long long)n,
                   (unsigned long long)checksum, (unsigned long long)sum,
                   (unsigned long long)found);
        fflush(stdout);
        nanosleep(&tick, NULL);
    }
}

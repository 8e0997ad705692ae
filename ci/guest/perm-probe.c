/*
 * ext-perm-probe: the L2 guest side of the lab scenario `perm` (ci/scenarios/perm.sh).
 *
 * Runs as root in the L2 guest (l2-init, ext.test=perm), at CPL3. It lays out four locked
 * pages of its own, reports their guest-physical addresses (from /proc/self/pagemap) on
 * the console, and then runs one phase per command line it reads from the console; the
 * scenario changes the pages' permissions through ext-vmm's REST API between phases.
 *
 *   page 0  data: one u64, 0x1111111111111111
 *   page 1  exec: `mov eax, 0x600d; ret`
 *   page 2  straddle-a: its last 5 bytes start `mov rax, 0x1122334455667788` (10 bytes)...
 *   page 3  straddle-b: ...whose last 5 bytes are here, followed by `ret` at offset 5
 *
 * Commands and the line each one prints (the guest-visible results the scenario checks):
 *   write     writes 0x2222222222222222 to the data page, reads it back:
 *             EXT-PERM-WRITE value=<read back> sigsegv=<n>
 *   exec      calls the exec page:
 *             EXT-PERM-EXEC sigsegv=<n> fault_off=<fault rip - page> returned=<rax or none>
 *   straddle  calls the straddling mov:
 *             EXT-PERM-STRADDLE sigsegv=<n> rax=<rax at the fault> fault_off=<rip - page b>
 *   restore   all three again (expects everything allowed):
 *             EXT-PERM-RESTORED exec=<rax> straddle=<rax> value=<read back> sigsegv=<n>
 *   views     pinned to CPU 0, writes 0x3333333333333333 to the data page; pinned to CPU 1,
 *             writes 0x4444444444444444 (the scenario puts vCPU 1 in a view where the page
 *             is read-only):
 *             EXT-PERM-VIEWS cpu0=<cpu> value0=<read back> sigsegv0=<n> cpu1=... value1=...
 *   done      prints EXT-PERM-DONE and exits.
 *
 * A refused access reaches the program as SIGSEGV (ext-vmm injects #GP(0)); the handler
 * records RIP and RAX from the signal context and jumps back to the phase.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#define PAGE 4096UL
#define VALUE_OLD 0x1111111111111111ULL
#define VALUE_NEW 0x2222222222222222ULL
#define STRADDLE_IMM 0x1122334455667788ULL
#define EXEC_RESULT 0x600dULL
#define VALUE_CPU0 0x3333333333333333ULL
#define VALUE_CPU1 0x4444444444444444ULL

typedef uint64_t (*guest_fn)(void);

static sigjmp_buf recover;
static volatile sig_atomic_t faults;
static volatile uint64_t fault_rip, fault_rax;

static void on_segv(int sig, siginfo_t *info, void *context)
{
    ucontext_t *uc = context;

    (void)sig;
    (void)info;
    faults++;
    fault_rip = (uint64_t)uc->uc_mcontext.gregs[REG_RIP];
    fault_rax = (uint64_t)uc->uc_mcontext.gregs[REG_RAX];
    siglongjmp(recover, 1);
}

static void die(const char *what)
{
    printf("EXT-PERM-FATAL %s\n", what);
    fflush(stdout);
    exit(1);
}

/* Guest-physical address of the page holding va (0 when not present). */
static uint64_t gpa_of(int pagemap, const void *va)
{
    uint64_t entry;
    off_t offset = (off_t)((uintptr_t)va / PAGE * sizeof(entry));

    if (pread(pagemap, &entry, sizeof(entry), offset) != (ssize_t)sizeof(entry))
        die("pread /proc/self/pagemap");
    if (!(entry >> 63 & 1))
        return 0;
    return (entry & ((1ULL << 55) - 1)) * PAGE;
}

/* Calls fn; returns 1 and sets *result if it returned, 0 if it faulted. */
static int call_guarded(guest_fn fn, uint64_t *result)
{
    if (sigsetjmp(recover, 1) != 0)
        return 0;
    *result = fn();
    return 1;
}

/* Writes value to *slot unless that faults; returns 1 if the store ran without a fault. */
static int store_guarded(volatile uint64_t *slot, uint64_t value)
{
    if (sigsetjmp(recover, 1) != 0)
        return 0;
    *slot = value;
    return 1;
}

/* Moves this process to `cpu` (the guest's CPU n is vCPU n); returns the CPU it runs on. */
static int run_on(int cpu)
{
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0)
        return -1;
    return sched_getcpu();
}

/* Reads console lines until one equals command. */
static void wait_for(const char *command)
{
    char line[128];

    printf("EXT-PERM-WAIT %s\n", command);
    fflush(stdout);
    while (fgets(line, sizeof(line), stdin)) {
        line[strcspn(line, "\r\n")] = 0;
        if (strcmp(line, command) == 0)
            return;
    }
    die("console input closed");
}

int main(void)
{
    static const uint8_t exec_code[] = { 0xb8, 0x0d, 0x60, 0x00, 0x00, 0xc3 };
    struct sigaction action;
    uint8_t *pages, *exec_page, *page_a, *page_b;
    volatile uint64_t *value;
    uint64_t imm = STRADDLE_IMM, result = 0, exec_result = 0, straddle_result = 0;
    int pagemap, ok;

    setvbuf(stdout, NULL, _IOLBF, 0);
    pages = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE | PROT_EXEC,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (pages == MAP_FAILED)
        die("mmap");
    memset(pages, 0xcc, 4 * PAGE); /* int3 everywhere else: a stray jump traps */
    /* Locked, so the guest kernel keeps each page on the same frame during the test. */
    if (mlock(pages, 4 * PAGE) != 0)
        die("mlock");
    value = (volatile uint64_t *)pages;
    exec_page = pages + PAGE;
    page_a = pages + 2 * PAGE;
    page_b = pages + 3 * PAGE;
    *value = VALUE_OLD;
    memcpy(exec_page, exec_code, sizeof(exec_code));
    page_a[PAGE - 5] = 0x48; /* REX.W */
    page_a[PAGE - 4] = 0xb8; /* mov rax, imm64 */
    memcpy(page_a + PAGE - 3, &imm, 8); /* 3 immediate bytes in page a, 5 in page b */
    page_b[5] = 0xc3; /* ret */

    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, NULL) != 0)
        die("sigaction");

    /* Baseline with every page allowed: the code itself must be right. */
    if (!call_guarded((guest_fn)exec_page, &exec_result) || exec_result != EXEC_RESULT)
        die("baseline exec page call");
    if (!call_guarded((guest_fn)(page_a + PAGE - 5), &straddle_result) ||
        straddle_result != STRADDLE_IMM)
        die("baseline straddle call");

    pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap < 0)
        die("open /proc/self/pagemap");
    printf("EXT-PERM-READY data=%#llx exec=%#llx straddle_a=%#llx straddle_b=%#llx "
           "value=%#llx baseline_exec=%#llx baseline_straddle=%#llx\n",
           (unsigned long long)gpa_of(pagemap, pages),
           (unsigned long long)gpa_of(pagemap, exec_page),
           (unsigned long long)gpa_of(pagemap, page_a),
           (unsigned long long)gpa_of(pagemap, page_b), (unsigned long long)*value,
           (unsigned long long)exec_result, (unsigned long long)straddle_result);

    wait_for("write");
    faults = 0;
    store_guarded(value, VALUE_NEW);
    printf("EXT-PERM-WRITE value=%#llx sigsegv=%d\n", (unsigned long long)*value, (int)faults);

    wait_for("exec");
    faults = 0;
    fault_rip = 0;
    ok = call_guarded((guest_fn)exec_page, &result);
    printf("EXT-PERM-EXEC sigsegv=%d fault_off=%lld returned=%s%#llx\n", (int)faults,
           (long long)(fault_rip - (uint64_t)(uintptr_t)exec_page), ok ? "" : "none:",
           (unsigned long long)(ok ? result : 0));

    wait_for("straddle");
    faults = 0;
    fault_rip = 0;
    fault_rax = 0;
    ok = call_guarded((guest_fn)(page_a + PAGE - 5), &result);
    printf("EXT-PERM-STRADDLE sigsegv=%d rax=%#llx fault_off=%lld returned=%s%#llx\n",
           (int)faults, (unsigned long long)fault_rax,
           (long long)(fault_rip - (uint64_t)(uintptr_t)page_b), ok ? "" : "none:",
           (unsigned long long)(ok ? result : 0));

    wait_for("restore");
    faults = 0;
    exec_result = straddle_result = 0;
    call_guarded((guest_fn)exec_page, &exec_result);
    call_guarded((guest_fn)(page_a + PAGE - 5), &straddle_result);
    store_guarded(value, VALUE_NEW);
    printf("EXT-PERM-RESTORED exec=%#llx straddle=%#llx value=%#llx sigsegv=%d\n",
           (unsigned long long)exec_result, (unsigned long long)straddle_result,
           (unsigned long long)*value, (int)faults);

    wait_for("views");
    {
        int cpu0, cpu1, faults0, faults1;
        uint64_t value0, value1;

        faults = 0;
        cpu0 = run_on(0);
        store_guarded(value, VALUE_CPU0);
        value0 = *value;
        faults0 = faults;
        faults = 0;
        cpu1 = run_on(1);
        store_guarded(value, VALUE_CPU1);
        value1 = *value;
        faults1 = faults;
        printf("EXT-PERM-VIEWS cpu0=%d value0=%#llx sigsegv0=%d cpu1=%d value1=%#llx sigsegv1=%d\n",
               cpu0, (unsigned long long)value0, faults0, cpu1, (unsigned long long)value1,
               faults1);
    }

    wait_for("done");
    printf("EXT-PERM-DONE\n");
    return 0;
}

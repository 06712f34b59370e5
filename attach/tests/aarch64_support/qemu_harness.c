/*
 * Runs hooked aarch64 code natively (under qemu-user on an x86_64 host): a second opinion on
 * Unicorn's semantics for the hook engine's stubs and trampolines. Built static and linked
 * high (-Ttext-segment), so the fixed addresses of aarch64_support/mod.rs are free.
 *
 * stdin: records starting with a u32 kind (little-endian):
 *   1 map:   u64 addr, u64 len, u32 exec   anonymous memory at exactly addr
 *   2 write: u64 addr, u32 len, bytes      executable memory is made RW for the copy, then RX
 *                                          again (never W and X at once), icache flushed
 *   3 call:  u64 entry, u64 x0, u64 x1, u64 user
 *            calls entry(x0, x1) as a C function; prints one line:
 *            "ret hits regs[0] regs[1] pc" (hex) with hits and regs read from the user area
 *            the handler fills (aarch64_support: hits at +0, user_pt_regs at +8)
 *   0 end
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_REGIONS 16

static struct {
    uint64_t addr, len;
    int exec;
} regions[MAX_REGIONS];
static int nregions;

static void die(const char *what) {
    fprintf(stderr, "harness: %s (errno %d)\n", what, errno);
    exit(1);
}

static void get(void *p, size_t n) {
    if (fread(p, 1, n, stdin) != n) die("short input");
}

static uint32_t u32(void) {
    uint32_t v;
    get(&v, sizeof v);
    return v;
}

static uint64_t u64(void) {
    uint64_t v;
    get(&v, sizeof v);
    return v;
}

static int region_of(uint64_t addr, uint64_t len) {
    for (int i = 0; i < nregions; i++)
        if (addr >= regions[i].addr && addr + len <= regions[i].addr + regions[i].len) return i;
    die("write outside the mapped regions");
    return -1;
}

int main(void) {
    for (;;) {
        uint32_t kind = u32();
        if (kind == 0) return 0;
        if (kind == 1) {
            uint64_t addr = u64(), len = u64();
            uint32_t exec = u32();
            if (nregions == MAX_REGIONS) die("too many regions");
            void *p = mmap((void *)addr, len, exec ? PROT_READ | PROT_EXEC : PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (p != (void *)addr) die("mmap at a fixed address");
            regions[nregions].addr = addr;
            regions[nregions].len = len;
            regions[nregions].exec = exec;
            nregions++;
        } else if (kind == 2) {
            uint64_t addr = u64();
            uint32_t len = u32();
            int r = region_of(addr, len);
            if (regions[r].exec &&
                mprotect((void *)regions[r].addr, regions[r].len, PROT_READ | PROT_WRITE))
                die("mprotect rw");
            get((void *)addr, len);
            if (regions[r].exec) {
                if (mprotect((void *)regions[r].addr, regions[r].len, PROT_READ | PROT_EXEC))
                    die("mprotect rx");
                __builtin___clear_cache((char *)addr, (char *)addr + len);
            }
        } else if (kind == 3) {
            uint64_t entry = u64(), x0 = u64(), x1 = u64(), user = u64();
            uint64_t (*f)(uint64_t, uint64_t) = (uint64_t(*)(uint64_t, uint64_t))entry;
            uint64_t ret = f(x0, x1);
            const uint64_t *u = (const uint64_t *)user;
            printf("%llx %llx %llx %llx %llx\n", (unsigned long long)ret, (unsigned long long)u[0],
                   (unsigned long long)u[1], (unsigned long long)u[2],
                   (unsigned long long)u[1 + 32]);
        } else {
            die("unknown record");
        }
    }
}

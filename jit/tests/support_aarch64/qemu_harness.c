/*
 * Runs aarch64 JIT code natively (under qemu-user on an x86_64 host): a second opinion on
 * Unicorn's semantics. Built static and non-PIE, so `unwind` (conformance helper 5) has the
 * same address in every run; `--helper-address` prints it for the compiler.
 *
 * stdin: records of
 *   u32 name_len, name, u32 code_len, code, u32 entry, u32 mem_len, mem
 * stdout: one line per record:
 *   name r0 trap_kind trap_pc trap_addr mem-as-hex
 *
 * Code is mapped RW, copied, then made RX (never W and X at once) and the icache flushed.
 * The layout of JitContext and CallEnv follows jit/src/abi.rs and vm/src/helper.rs.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct call_env {
    uint32_t status, fault_code;
    uint64_t exit_value, ctx;
    void *host, *mem;
};

struct jit_context {
    uint64_t frame_top;
    struct call_env *env;
    void *check, *mem, *helpers;
    uint64_t helpers_len;
    uint32_t trap_kind, trap_pc;
    uint64_t trap_addr, trap_len, trap_write, tail_calls, saved_sp, reserved[4];
    uint64_t stack_lo, fast_start, fast_len, fast_wlen;
    void *tail_tables;
    uint64_t tail_tables_len;
};

_Static_assert(__builtin_offsetof(struct jit_context, trap_kind) == 48, "abi");
_Static_assert(__builtin_offsetof(struct jit_context, saved_sp) == 88, "abi");
_Static_assert(__builtin_offsetof(struct jit_context, stack_lo) == 128, "abi");
_Static_assert(__builtin_offsetof(struct jit_context, tail_tables_len) == 168, "abi");
_Static_assert(__builtin_offsetof(struct call_env, exit_value) == 8, "abi");

static uint8_t stack[4096] __attribute__((aligned(16)));
static uint8_t *block;
static uint64_t block_len;

static bool inside(uint64_t start, uint64_t n, uint64_t addr, uint64_t len) {
    return addr >= start && addr + len >= addr && addr + len <= start + n;
}

static bool check(void *mem, uint64_t addr, uint64_t len, uint64_t write) {
    (void)mem;
    (void)write;
    return inside((uint64_t)stack, sizeof stack, addr, len) ||
           (block_len && inside((uint64_t)block, block_len, addr, len));
}

uint64_t unwind(uint64_t r1, uint64_t r2, uint64_t r3, uint64_t r4, uint64_t r5,
                struct call_env *env) {
    (void)r2, (void)r3, (void)r4, (void)r5;
    if (r1 == 0) {
        env->status = 1;
        env->exit_value = 0;
    }
    return r1;
}

static void *read_exact(uint32_t n) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, stdin) != n) {
        fprintf(stderr, "truncated input\n");
        exit(2);
    }
    return p;
}

static uint32_t read_u32(bool *eof) {
    uint32_t v;
    size_t got = fread(&v, 1, 4, stdin);
    *eof = got == 0;
    if (got != 0 && got != 4) {
        fprintf(stderr, "truncated input\n");
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--helper-address") == 0) {
        printf("%#lx\n", (unsigned long)(uintptr_t)unwind);
        return 0;
    }
    bool eof;
    for (;;) {
        uint32_t name_len = read_u32(&eof);
        if (eof)
            break;
        char *name = read_exact(name_len);
        uint32_t code_len = read_u32(&eof);
        uint8_t *code = read_exact(code_len);
        uint32_t entry = read_u32(&eof);
        block_len = read_u32(&eof);
        block = read_exact((uint32_t)block_len);

        size_t map_len = (code_len + 4095) & ~(size_t)4095;
        uint8_t *x = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (x == MAP_FAILED) {
            perror("mmap");
            return 2;
        }
        memcpy(x, code, code_len);
        if (mprotect(x, map_len, PROT_READ | PROT_EXEC) != 0) {
            perror("mprotect");
            return 2;
        }
        __builtin___clear_cache((char *)x, (char *)x + code_len);

        memset(stack, 0, sizeof stack);
        struct call_env env = {0};
        struct jit_context ctx = {0};
        ctx.frame_top = (uint64_t)stack + sizeof stack;
        ctx.stack_lo = (uint64_t)stack;
        ctx.env = &env;
        ctx.check = (void *)check;
        /* The `callx` table: helper 5 only. */
        void *table[6] = {[5] = (void *)unwind};
        ctx.helpers = table;
        ctx.helpers_len = 6;
        uint64_t r1 = block_len ? (uint64_t)block : 0;
        env.ctx = r1;
        uint64_t (*fn)(uint64_t, uint64_t, struct jit_context *) = (void *)(x + entry);
        uint64_t r0 = fn(r1, block_len, &ctx);

        printf("%.*s %#lx %u %u %#lx ", (int)name_len, name, (unsigned long)r0, ctx.trap_kind,
               ctx.trap_pc, (unsigned long)ctx.trap_addr);
        for (uint64_t i = 0; i < block_len; i++)
            printf("%02x", block[i]);
        printf("\n");
        fflush(stdout);
        munmap(x, map_len);
        free(name);
        free(code);
        free(block);
    }
    return 0;
}

/* Native C versions of the programs in benches/programs/, the same algorithms written plainly, built with
 * `clang -O2 -shared -fPIC` by benches/jit.rs at start-up. Each takes the memory block the eBPF
 * program gets in r1/r2 and returns its r0. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

uint64_t bench_log2(uint8_t *mem, uint64_t len) {
    (void)mem;
    (void)len;
    uint64_t sum = 0;
    for (uint64_t i = 1; i <= 1000; i++) {
        uint64_t x = ((i * 0x9e3779b97f4a7c15ull) >> (i & 63)) | 1;
        uint64_t r = 0, y;
        if ((y = x >> 32) != 0) { r += 32; x = y; }
        if ((y = x >> 16) != 0) { r += 16; x = y; }
        if ((y = x >> 8) != 0) { r += 8; x = y; }
        if ((y = x >> 4) != 0) { r += 4; x = y; }
        if ((y = x >> 2) != 0) { r += 2; x = y; }
        if ((y = x >> 1) != 0) { r += 1; }
        sum += r;
    }
    return sum;
}

uint64_t bench_prime(uint8_t *mem, uint64_t len) {
    (void)mem;
    (void)len;
    uint64_t count = 0;
    for (uint64_t n = 2; n < 1000; n++) {
        uint64_t d = 2;
        for (;;) {
            if (d * d > n) { count++; break; }
            if (n % d == 0) break;
            d++;
        }
    }
    return count;
}

uint64_t bench_memcpy(uint8_t *mem, uint64_t len) {
    (void)len;
    uint8_t stack[512];
    for (int i = 0; i < 256; i++) stack[i] = mem[i];
    for (int i = 0; i < 256; i += 8) memcpy(&stack[256 + i], &stack[i], 8);
    uint64_t r = 0;
    for (int i = 0; i < 256; i += 8) {
        uint64_t w;
        memcpy(&w, &stack[256 + i], 8);
        r = r * 31 + w;
    }
    return r;
}

uint64_t bench_switch(uint8_t *mem, uint64_t len) {
    (void)mem;
    (void)len;
    uint64_t acc = 0, state = 12345;
    for (uint64_t i = 0; i < 1000; i++) {
        state = (state * 1103515245 + 12345) & 0x7fffffff;
        uint64_t c = (state >> 16) % 10;
        switch (c) {
        case 0: acc += 3; break;
        case 1: acc ^= 0x55; break;
        case 2: acc *= 3; break;
        case 3: acc -= 7; break;
        case 4: acc += c; break;
        case 5: acc >>= 1; break;
        case 6: acc |= 0x100; break;
        case 7: acc += i; break;
        case 8: acc <<= 2; break;
        default: acc += 9001; break;
        }
    }
    return acc;
}

uint64_t bench_strcmp(uint8_t *mem, uint64_t len) {
    (void)len;
    uint64_t r = 0;
    for (int slot = 0; slot < 512; slot += 64) {
        const uint8_t *a = mem + slot, *b = mem + 512;
        while (*a == *b && *a != 0) { a++; b++; }
        r = r * 1000 + (uint64_t)((int64_t)*a - (int64_t)*b + 256);
    }
    return r;
}

uint64_t bench_map_lookup(uint8_t *mem, uint64_t len, uint64_t (*lookup)(uint64_t, uint64_t)) {
    (void)mem;
    (void)len;
    uint64_t sum = 0;
    for (uint64_t key = 0; key < 1000; key++) {
        const uint64_t *v = (const uint64_t *)(uintptr_t)lookup(1, key);
        if (v) sum += *v;
    }
    return sum;
}

# strcmp of a key string against 8 strings. Memory: 8 NUL-terminated strings in 64-byte slots
# at offsets 0, 64, ..., 448, the key at 512. Each comparison gives d = s[i] - key[i] at the
# first difference (0 when equal); r0 = r0 * 1000 + (d + 256) over the 8 strings.
# Result: checked against Rust in benches/vm.rs.
        mov %r0, 0
        mov %r6, 0                      # slot offset
outer:
        mov %r2, %r1
        add %r2, %r6
        mov %r3, %r1
        add %r3, 512
inner:
        ldxb %r4, [%r2+0]
        ldxb %r5, [%r3+0]
        jne %r4, %r5, differ
        jeq %r4, 0, differ              # both ended: equal
        add %r2, 1
        add %r3, 1
        ja inner
differ:
        sub %r4, %r5
        add %r4, 256
        mul %r0, 1000
        add %r0, %r4
        add %r6, 64
        jlt %r6, 512, outer
        exit

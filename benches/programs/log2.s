# Integer log2 of 1000 pseudo-random values, summed.
#
# x_i = ((i * 0x9e3779b97f4a7c15) >> (i & 63)) | 1 for i in 1..=1000; log2 by a branchy binary
# search over 32/16/8/4/2/1-bit steps. Result: 30970 (benches/vm.rs checks it against Rust).
        mov %r6, 1                      # i
        mov %r7, 0                      # sum
        lddw %r8, 0x9e3779b97f4a7c15
loop:
        mov %r1, %r6
        mul %r1, %r8
        mov %r3, %r6
        and %r3, 63
        rsh %r1, %r3
        or %r1, 1
        mov %r0, 0
        mov %r2, %r1
        rsh %r2, 32
        jeq %r2, 0, step16
        add %r0, 32
        mov %r1, %r2
step16:
        mov %r2, %r1
        rsh %r2, 16
        jeq %r2, 0, step8
        add %r0, 16
        mov %r1, %r2
step8:
        mov %r2, %r1
        rsh %r2, 8
        jeq %r2, 0, step4
        add %r0, 8
        mov %r1, %r2
step4:
        mov %r2, %r1
        rsh %r2, 4
        jeq %r2, 0, step2
        add %r0, 4
        mov %r1, %r2
step2:
        mov %r2, %r1
        rsh %r2, 2
        jeq %r2, 0, step1
        add %r0, 2
        mov %r1, %r2
step1:
        mov %r2, %r1
        rsh %r2, 1
        jeq %r2, 0, done
        add %r0, 1
done:
        add %r7, %r0
        add %r6, 1
        jle %r6, 1000, loop
        mov %r0, %r7
        exit

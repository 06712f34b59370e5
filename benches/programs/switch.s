# A 10-way switch compiled as a chain of comparisons, in a loop of 1000 iterations. The case
# is (lcg >> 16) % 10 of a 31-bit LCG; each case updates the accumulator r0 differently.
# Result: 0x438892ef4f2d4b35 (checked against Rust in benches/vm.rs).
        mov %r0, 0                      # accumulator
        mov %r6, 0                      # i
        mov %r7, 12345                  # LCG state
loop:
        mul %r7, 1103515245
        add %r7, 12345
        and %r7, 0x7fffffff
        mov %r1, %r7
        rsh %r1, 16
        mod %r1, 10
        jeq %r1, 0, case0
        jeq %r1, 1, case1
        jeq %r1, 2, case2
        jeq %r1, 3, case3
        jeq %r1, 4, case4
        jeq %r1, 5, case5
        jeq %r1, 6, case6
        jeq %r1, 7, case7
        jeq %r1, 8, case8
        add %r0, 9001                   # default (9)
        ja next
case0:
        add %r0, 3
        ja next
case1:
        xor %r0, 0x55
        ja next
case2:
        mul %r0, 3
        ja next
case3:
        sub %r0, 7
        ja next
case4:
        add %r0, %r1
        ja next
case5:
        rsh %r0, 1
        ja next
case6:
        or %r0, 0x100
        ja next
case7:
        add %r0, %r6
        ja next
case8:
        lsh %r0, 2
next:
        add %r6, 1
        jlt %r6, 1000, loop
        exit

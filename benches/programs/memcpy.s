# Copies 256 bytes from the memory block (r1) to the stack byte by byte, copies that copy again
# within the stack 8 bytes at a time, then checksums the second copy (r0 = r0 * 31 + dword).
# The memory block is only read, so rbpf can be given it by shared reference.
# Memory: byte i = (i * 37 + 11) mod 256. Result: 0x799b684367dd5580 (checked in benches/vm.rs).
        mov %r2, %r10
        add %r2, -512                   # first copy at fp-512, second at fp-256
        mov %r3, 0
copy_bytes:
        mov %r4, %r1
        add %r4, %r3
        ldxb %r5, [%r4+0]
        mov %r4, %r2
        add %r4, %r3
        stxb [%r4+0], %r5
        add %r3, 1
        jlt %r3, 256, copy_bytes
        mov %r3, 0
copy_words:
        mov %r4, %r2
        add %r4, %r3
        ldxdw %r5, [%r4+0]
        stxdw [%r4+256], %r5
        add %r3, 8
        jlt %r3, 256, copy_words
        mov %r0, 0
        mov %r3, 0
checksum:
        mov %r4, %r2
        add %r4, %r3
        ldxdw %r5, [%r4+256]
        mul %r0, 31
        add %r0, %r5
        add %r3, 8
        jlt %r3, 256, checksum
        exit

# Looks up keys 0..999 in a hash map through helper 1 (r1 = map, r2 = key; returns a pointer
# to the 8-byte value or 0) and sums the values found. The map (benches/jit.rs) holds the even
# keys with value 3 * key. Result: 748500.
        mov %r6, 0                      # key
        mov %r7, 0                      # sum
loop:
        lddw %r1, 0x1                   # the map handle
        mov %r2, %r6
        call 1
        jeq %r0, 0, miss
        ldxdw %r1, [%r0+0]
        add %r7, %r1
miss:
        add %r6, 1
        jlt %r6, 1000, loop
        mov %r0, %r7
        exit

# Counts the primes below 1000 by trial division. Result: 168.
        mov %r0, 0                      # primes found
        mov %r6, 2                      # candidate n
next_n:
        mov %r7, 2                      # divisor d
try_d:
        mov %r1, %r7
        mul %r1, %r7
        jgt %r1, %r6, is_prime          # d * d > n
        mov %r2, %r6
        mod %r2, %r7
        jeq %r2, 0, not_prime
        add %r7, 1
        ja try_d
is_prime:
        add %r0, 1
not_prime:
        add %r6, 1
        jlt %r6, 1000, next_n
        exit

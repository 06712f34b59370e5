// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * librawsys.so: a library that makes a system call from its own `syscall` instruction, not
 * through libc (syscall-raw-victim loads it with dlopen).
 */

/* long rawlib_getuid(void): getuid (102) from this library's text. */
__asm__(".text\n"
	".globl rawlib_getuid\n"
	".type rawlib_getuid, @function\n"
	"rawlib_getuid:\n"
	"	movl $102, %eax\n"
	"	syscall\n"
	"	ret\n"
	".size rawlib_getuid, . - rawlib_getuid\n");

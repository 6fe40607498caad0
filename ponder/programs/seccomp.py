"""The sandbox's seccomp filter (``seccomp_filter``, handed to bwrap through ``seccomp_pipe``): which syscalls a
sandboxed program may not make, per CPU architecture, as a classic-BPF program. ``ponder.programs.sandbox``'s
docstring says why each is refused."""

from __future__ import annotations

import errno
import os
import platform
import struct
from functools import cache

# Native ABI of each CPU architecture ponder has a seccomp filter for: AUDIT_ARCH_*, and the numbers of the syscalls
# the filter names, from the kernel's asm/unistd_64.h (x86_64) and asm-generic/unistd.h (aarch64). aarch64 has no
# fork, vfork, chmod, chown, lchown or inotify_init: only their *at / *1 forms.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALL_NUMBERS = {
    "x86_64": {
        "clone": 56, "clone3": 435, "fork": 57, "vfork": 58, "io_uring_setup": 425, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "add_key": 248, "request_key": 249, "keyctl": 250,
        "shmget": 29, "msgget": 68, "semget": 64, "mq_open": 240, "setxattr": 188, "lsetxattr": 189,
        "fsetxattr": 190, "setxattrat": 463, "inotify_init": 253, "inotify_init1": 294, "fanotify_init": 300,
        "fallocate": 285, "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93,
        "lchown": 94, "fchownat": 260, "socket": 41, "socketpair": 53, "fcntl": 72,
    },
    "aarch64": {
        "clone": 220, "clone3": 435, "io_uring_setup": 425, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "add_key": 217, "request_key": 218, "keyctl": 219, "shmget": 194, "msgget": 186, "semget": 190,
        "mq_open": 180, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "setxattrat": 463, "inotify_init1": 26,
        "fanotify_init": 262, "fallocate": 47, "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "fchown": 55,
        "fchownat": 54, "socket": 198, "socketpair": 199, "fcntl": 25,
    },
}
# Refused outright (EPERM), where the architecture has them.
REFUSED_SYSCALLS = (
    "clone", "clone3", "fork", "vfork",  # processes and threads
    # what holds host memory that no rlimit counts: System V IPC and POSIX message queues (each kind is refused at
    # its creation, so nothing else has an object to act on), extended attributes, inotify and fanotify watches
    "shmget", "msgget", "semget", "mq_open", "setxattr", "lsetxattr", "fsetxattr", "setxattrat", "inotify_init",
    "inotify_init1", "fanotify_init",
    # what reshapes a file or its metadata beyond the limits: allocation past its size, modes (set-id bits), owners
    "fallocate", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    # kernel interfaces a program never needs and exploits often use
    "io_uring_setup", "bpf", "perf_event_open", "userfaultfd", "add_key", "request_key", "keyctl",
)
AF_UNIX, F_SETLEASE = 1, 1024
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same syscalls under other numbers, refused as a whole


def seccomp_pipe() -> int:
    """The read end of a pipe holding the seccomp filter (bwrap reads it to the end and loads it)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, seccomp_filter())
    finally:
        os.close(write_end)
    return read_end


@cache
def seccomp_filter() -> bytes:
    """A classic-BPF seccomp program: syscalls of another ABI and those of ``REFUSED_SYSCALLS`` fail with EPERM,
    ``socket`` and ``socketpair`` of any family but ``AF_UNIX`` with EAFNOSUPPORT, ``fcntl(F_SETLEASE)`` with EPERM.

    Each instruction is ``struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}``; the filter reads ``struct
    seccomp_data`` (``nr`` at offset 0, ``arch`` at 4, the arguments as 64-bit words from 16: the family and the
    command are ints, so their low words, first on these little-endian CPUs, are what the kernel uses). Jumps count
    the instructions they skip.
    """
    machine = platform.machine()
    numbers = SYSCALL_NUMBERS[machine]
    load_word, jump_if_equal, jump_if_at_least, give = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JGE|K, RET|K
    allow = 0x7FFF0000  # SECCOMP_RET_ALLOW

    def refuse(error: int) -> int:
        return 0x00050000 | error  # SECCOMP_RET_ERRNO

    def op(code: int, k: int, skip_if_true: int = 0, skip_if_false: int = 0) -> bytes:
        return struct.pack("=HBBI", code, skip_if_true, skip_if_false, k)

    def argument_rule(syscall: str, argument: int, value: int, if_equal: int, otherwise: int) -> list[bytes]:
        """Decide ``syscall`` by whether its ``argument`` equals ``value``; other syscalls go on to what follows."""
        return [op(jump_if_equal, numbers[syscall], skip_if_false=4), op(load_word, 16 + 8 * argument),
                op(jump_if_equal, value, skip_if_false=1), op(give, if_equal), op(give, otherwise)]

    program = [op(load_word, 4), op(jump_if_equal, AUDIT_ARCH[machine], skip_if_true=1), op(give, refuse(errno.EPERM)),
               op(load_word, 0)]
    if machine == "x86_64":
        program += [op(jump_if_at_least, X32_SYSCALL_BIT, skip_if_false=1), op(give, refuse(errno.EPERM))]
    for name in REFUSED_SYSCALLS:
        if name in numbers:
            program += [op(jump_if_equal, numbers[name], skip_if_false=1), op(give, refuse(errno.EPERM))]
    for syscall in ("socket", "socketpair"):
        program += argument_rule(syscall, 0, AF_UNIX, allow, refuse(errno.EAFNOSUPPORT))
    program += argument_rule("fcntl", 1, F_SETLEASE, refuse(errno.EPERM), allow)
    program.append(op(give, allow))
    return b"".join(program)

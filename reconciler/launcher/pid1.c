/*
 * pid1: what stays of a container's init once the command runs (see reconciler/launcher/init.py).
 *
 * The Python init (a fork of the launch helper) sets the container up, forks the command, and then
 * replaces itself with this program, exec'd from a sealed memfd copy, so that the process a
 * container sees as its PID 1 holds nothing of the host: no Python heap (earlier launches' specs),
 * no host interpreter or library mapped, no directory of the host open, an empty environment, no
 * capability but CAP_KILL, no_new_privs, non-dumpable, and a seccomp filter allowing only the few
 * calls below. Even a container granted CAP_SYS_PTRACE that takes it over can do no more with it
 * than signal its own processes and write its own exit status.
 *
 *     pid1 COMMAND_PID         fd 3: the container's `status` file (empty, opened for writing)
 *                              fd 4: the command's release: the command, set up, waits to exec
 *                                    until this is closed, so none of the container's code runs
 *                                    while its PID 1 is still the privileged Python init
 *                              fd 5: the command's exec errors (EOF at once when its exec succeeds)
 *
 * It releases the command, reads whether its exec failed, reaps every process re-parented to it,
 * passes termination signals on to the command (they were blocked by the Python init, so none is
 * lost across the exec), and when the command is gone writes its wait status into fd 3 as JSON (or
 * the exec failure, as the Python init would have), and exits with the command's code (128 + signal).
 * The agent reads that file once this process is gone, which is what makes an exit code survive
 * agent restarts.
 *
 * Built statically at install (setup.py): no dynamic loader, since it runs inside the container's
 * root filesystem. Only async-signal-safe, allocation-free calls are used after the filter is on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STATUS_FD 3
#define RELEASE_FD 4
#define ERRORS_FD 5

#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#elif defined(__riscv) && __riscv_xlen == 64
#define NATIVE_ARCH AUDIT_ARCH_RISCV64
#elif defined(__powerpc64__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NATIVE_ARCH AUDIT_ARCH_PPC64LE
#elif defined(__s390x__)
#define NATIVE_ARCH AUDIT_ARCH_S390X
#else
#error "pid1: unsupported architecture"
#endif

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT};

#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

static int confine(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        ALLOW(__NR_wait4),
        ALLOW(__NR_rt_sigtimedwait),
        ALLOW(__NR_rt_sigprocmask),
        ALLOW(__NR_rt_sigreturn),
        ALLOW(__NR_restart_syscall),
        ALLOW(__NR_kill),
        ALLOW(__NR_pwrite64),
        ALLOW(__NR_read),
        ALLOW(__NR_close),
        ALLOW(__NR_clock_gettime),
        ALLOW(__NR_exit),
        ALLOW(__NR_exit_group),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
    };
    struct sock_fprog program = {.len = sizeof(filter) / sizeof(filter[0]), .filter = filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0);
}

/* Appends the decimal digits of `value` to `out`; returns the new end. No stdio after confine(). */
static char *put_number(char *out, long long value, int min_digits) {
    char digits[24];
    int n = 0;
    int negative = value < 0;
    unsigned long long magnitude = negative ? -(unsigned long long)value : (unsigned long long)value;
    do {
        digits[n++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude || n < min_digits);
    if (negative)
        *out++ = '-';
    while (n)
        *out++ = digits[--n];
    return out;
}

static char *put_text(char *out, const char *text) {
    size_t length = strlen(text);
    memcpy(out, text, length);
    return out + length;
}

/* JSON string contents of `text` (quotes, backslashes and control characters escaped). */
static char *put_escaped(char *out, const char *text, size_t length) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '"' || c == '\\') {
            *out++ = '\\';
            *out++ = (char)c;
        } else if (c < 0x20) {
            out = put_text(out, "\\u00");
            *out++ = hex[c >> 4];
            *out++ = hex[c & 15];
        } else {
            *out++ = (char)c;
        }
    }
    return out;
}

/* The same document the Python init writes: wait_status, exit_code, exit_signal, finished_at, error.
 * With an exec failure, the wait status is null and the error says why (as the init reported it). */
static void write_status(int wait_status, const char *error, size_t error_length) {
    static char doc[256 + 6 * 4096];
    char *p = doc;
    struct timespec now = {0, 0};
    clock_gettime(CLOCK_REALTIME, &now);
    p = put_text(p, "{\"wait_status\": ");
    if (error_length)
        p = put_text(p, "null");
    else
        p = put_number(p, wait_status, 1);
    p = put_text(p, ", \"exit_code\": ");
    if (!error_length && WIFEXITED(wait_status))
        p = put_number(p, WEXITSTATUS(wait_status), 1);
    else
        p = put_text(p, "null");
    p = put_text(p, ", \"exit_signal\": ");
    if (!error_length && WIFSIGNALED(wait_status))
        p = put_number(p, WTERMSIG(wait_status), 1);
    else
        p = put_text(p, "null");
    p = put_text(p, ", \"finished_at\": ");
    p = put_number(p, now.tv_sec, 1);
    *p++ = '.';
    p = put_number(p, now.tv_nsec / 1000, 6);
    p = put_text(p, ", \"error\": ");
    if (error_length) {
        *p++ = '"';
        p = put_escaped(p, error, error_length);
        *p++ = '"';
    } else {
        p = put_text(p, "null");
    }
    *p++ = '}';
    (void)!pwrite(STATUS_FD, doc, (size_t)(p - doc), 0);
}

int main(int argc, char **argv) {
    if (argc != 2)
        return 127;
    pid_t command = 0;
    for (const char *digit = argv[1]; *digit; digit++) {
        if (*digit < '0' || *digit > '9' || command > 4194304)
            return 127;
        command = command * 10 + (*digit - '0');
    }
    if (command <= 0)
        return 127;
    prctl(PR_SET_NAME, "reconciler-init", 0, 0, 0);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    sigset_t waited;
    sigemptyset(&waited);
    sigaddset(&waited, SIGCHLD);
    for (size_t i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
        sigaddset(&waited, forwarded[i]);
    sigprocmask(SIG_BLOCK, &waited, NULL);

    if (confine() != 0)
        return 126;

    /* Only now may the command exec: this process holds nothing of the host any more. */
    close(RELEASE_FD);
    static char error[4096];
    size_t error_length = 0;
    for (;;) {
        ssize_t got = read(ERRORS_FD, error + error_length, sizeof error - 1 - error_length);
        if (got > 0 && error_length + (size_t)got < sizeof error - 1) {
            error_length += (size_t)got;
            continue;
        }
        if (got < 0 && errno == EINTR)
            continue;
        break;
    }
    close(ERRORS_FD);

    for (;;) {
        /* Reap first: the command may have ended before this program started. */
        for (;;) {
            int status;
            pid_t pid = (pid_t)syscall(__NR_wait4, -1, &status, WNOHANG, NULL);
            if (pid == command) {
                write_status(status, error, error_length);
                /* As the container's PID 1, leaving ends every process left in its pid namespace. */
                if (error_length)
                    return 1;
                if (WIFEXITED(status))
                    return WEXITSTATUS(status);
                return 128 + WTERMSIG(status);
            }
            if (pid <= 0)
                break;
        }
        siginfo_t info;
        int signo = sigwaitinfo(&waited, &info);
        if (signo > 0 && signo != SIGCHLD)
            kill(command, signo);
    }
}

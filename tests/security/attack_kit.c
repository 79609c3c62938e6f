/*
 * The attack kit: calls busybox has no applet for, made from inside a test container. Built statically
 * by tests/security/conftest.py (gcc -static). Each subcommand prints one line per attempt:
 * "<attempt>: ok" or "<attempt>: <errno name>", and never writes to anything it opened, so that a
 * defence that fails cannot damage the host: the test reads "opened for writing" as the escape.
 *
 *   kit setns PATH FILE        enter the mount namespace PATH, then try to open FILE
 *   kit mem-grep PID HEX...    attach to PID, read its memory, say which needle (hex-encoded) it found
 *   kit keyring                read and add to the keyrings the kernel shares with the host
 *   kit open-write PATH...     open each PATH for writing (nothing is written)
 *   kit map-files PID          open each /proc/PID/map_files entry for writing (nothing is written)
 *   kit handle PATH            name_to_handle_at + open_by_handle_at of PATH
 *   kit bpf                    load a trivial socket filter program
 *   kit unshare-user           unshare a user namespace
 *   kit ids                    print the real, effective and saved uids (setuid-root copies of the kit
 *                              show what a setuid program gains: unlike busybox, it drops nothing)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int report(const char *what, long result) {
    if (result < 0)
        printf("%s: %s\n", what, strerrorname_np(errno) ? strerrorname_np(errno) : "error");
    else
        printf("%s: ok\n", what);
    return result < 0;
}

static int open_write(const char *path) {
    int fd = open(path, O_WRONLY);
    char what[600];
    snprintf(what, sizeof what, "open-write %s", path);
    report(what, fd);
    if (fd >= 0)
        close(fd);
    return fd >= 0;
}

/* Needles come in hex, so that the strings looked for are in no process of the container. */
static char *unhex(const char *hex) {
    size_t length = strlen(hex) / 2;
    char *out = calloc(length + 1, 1);
    for (size_t i = 0; i < length; i++)
        sscanf(hex + 2 * i, "%2hhx", (unsigned char *)&out[i]);
    return out;
}

static int mem_grep(pid_t pid, int count, char **needles) {
    for (int i = 0; i < count; i++)
        needles[i] = unhex(needles[i]);
    report("ptrace-attach", ptrace(PTRACE_ATTACH, pid, 0, 0));
    waitpid(pid, NULL, __WALL);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "r");
    snprintf(path, sizeof path, "/proc/%d/mem", pid);
    int mem = open(path, O_RDONLY);
    report("open-mem", mem);
    if (maps && mem >= 0) {
        char line[512];
        static char buffer[1 << 22];
        while (fgets(line, sizeof line, maps)) {
            unsigned long start, end;
            char perms[5];
            if (sscanf(line, "%lx-%lx %4s", &start, &end, perms) != 3 || perms[0] != 'r')
                continue;
            for (unsigned long at = start; at < end; at += sizeof buffer) {
                size_t size = end - at < sizeof buffer ? end - at : sizeof buffer;
                ssize_t got = pread(mem, buffer, size, (off_t)at);
                for (int i = 0; got > 0 && i < count; i++)
                    if (memmem(buffer, (size_t)got, needles[i], strlen(needles[i])))
                        printf("found: needle %d\n", i);
            }
        }
    }
    ptrace(PTRACE_DETACH, pid, 0, 0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "setns") && argc == 4) {
        int ns = open(argv[2], O_RDONLY);
        report("open-ns", ns);
        report("setns", setns(ns, 0));
        int fd = open(argv[3], O_RDONLY);
        report("open-after-setns", fd);
        char data[256] = {0};
        if (fd >= 0 && read(fd, data, sizeof data - 1) > 0)
            printf("read: %s\n", data);
        return 0;
    }
    if (!strcmp(cmd, "mem-grep") && argc >= 3)
        return mem_grep(atoi(argv[2]), argc - 3, argv + 3);
    if (!strcmp(cmd, "keyring")) {
        report("keyctl-user-keyring", syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -4 /* user */, 0));
        report("keyctl-read-session", syscall(SYS_keyctl, 11 /* READ */, -3 /* session */, 0, 0));
        report("add-key-session", syscall(SYS_add_key, "user", "reconciler-test-key", "x", 1, -3));
        return 0;
    }
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
            char target[600] = {0};
            if (readlink(file, target, sizeof target - 1) > 0)
                printf("maps: %s\n", target);
            open_write(file);
        }
        return 0;
    }
    if (!strcmp(cmd, "handle") && argc == 3) {
        struct file_handle *handle = malloc(sizeof *handle + 128);
        handle->handle_bytes = 128;
        int mount_id;
        report("name-to-handle", name_to_handle_at(AT_FDCWD, argv[2], handle, &mount_id, 0));
        report("open-by-handle", open_by_handle_at(AT_FDCWD, handle, O_RDONLY));
        return 0;
    }
    if (!strcmp(cmd, "bpf")) {
        unsigned long long insns[2] = {0x00000000000000b7ULL /* r0 = 0 */, 0x0000000000000095ULL /* exit */};
        unsigned int attr[32] = {0};
        attr[0] = 1; /* BPF_PROG_TYPE_SOCKET_FILTER */
        attr[1] = 2;
        unsigned long long pointers[2] = {(unsigned long)insns, (unsigned long)"GPL"};
        memcpy(&attr[2], pointers, sizeof pointers);
        report("bpf-prog-load", syscall(SYS_bpf, 5, attr, sizeof attr));
        return 0;
    }
    if (!strcmp(cmd, "ids")) {
        uid_t real, effective, saved;
        getresuid(&real, &effective, &saved);
        printf("uids: %u %u %u\n", real, effective, saved);
        return 0;
    }
    if (!strcmp(cmd, "unshare-user")) {
        report("unshare-user", unshare(CLONE_NEWUSER));
        return 0;
    }
    return 2;
}

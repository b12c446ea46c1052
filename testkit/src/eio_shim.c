/*
 * LD_PRELOAD shim for fault tests: once the file named by CONCORD_EIO_TRIGGER
 * exists, fsync(2) and fdatasync(2) fail with EIO instead of reaching the disk,
 * as they do when a disk write-back fails. Before that they pass through.
 * Built by concord_testkit::faults::eio_shim.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *trigger = getenv("CONCORD_EIO_TRIGGER");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (failing()) {
        errno = EIO;
        return -1;
    }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) {
        errno = EIO;
        return -1;
    }
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

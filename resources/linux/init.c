// /init for the test initramfs: the first (and only) user-space program of a Linux guest.
//
// It exercises the guest kernel's virtio drivers against a vhost-user backend, then powers the
// machine off. Everything it reports goes to the console as lines starting with "VMM-INIT: ",
// which the test scripts grep for. Built static (`gcc -static -O2`): the initramfs holds no libc.
//
// Kernel command line parameters it reads (from /proc/cmdline):
//   vmmtest=boot   print "VMM-INIT: boot OK" and power off
//   vmmtest=blk    write a pattern to /dev/vda with O_DIRECT, read it back, report, power off
//   vmmblocks=N    how many 4 KiB blocks the blk test writes (default 256)
//
// The blk pattern (also checked on the host by check-pattern.py): block b holds the 8-byte
// little-endian magic 0x3158554E494C4D56 ("VMLINUX1"), then b as a little-endian u64, then for
// each byte offset i in 16..4096 the byte (b*31 + i*7) & 0xff. Every block differs, so a device
// that writes to the wrong sector or returns stale data is caught.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TEST_BLOCK_SIZE 4096
#define PATTERN_MAGIC 0x3158554E494C4D56ULL /* "VMLINUX1" read as little-endian */
#define DEFAULT_BLOCKS 256
#define DISK_WAIT_SECONDS 30
#define MODULE_LIST "/etc/modules-load" /* written by the asset builder, one path a line */

static void say(const char *fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n > sizeof(line) - 2) n = sizeof(line) - 2;
  line[n++] = '\n';
  // One write per line, so kernel messages printed meanwhile cannot split it.
  (void)!write(STDOUT_FILENO, "VMM-INIT: ", 10);
  (void)!write(STDOUT_FILENO, line, (size_t)n);
}

// PID 1 must never exit (the kernel panics); every path ends here.
static void power_off(void) {
  sync();
  reboot(RB_POWER_OFF);
  // Still here: reboot() failed. Say so, then idle; the host's timeout ends the run.
  say("power off failed: %s", strerror(errno));
  for (;;) pause();
}

// The kernel gives PID 1 a console only if /dev/console exists in the initramfs. Ours has no
// device nodes (so it can be built without root), so open the console once devtmpfs is up.
static void mount_early_filesystems(void) {
  mkdir("/dev", 0755);
  mkdir("/proc", 0755);
  mkdir("/sys", 0755);
  // Debian kernels have CONFIG_DEVTMPFS_MOUNT off: devtmpfs is there but not mounted for us.
  int dev_ok = mount("devtmpfs", "/dev", "devtmpfs", 0, "") == 0 || errno == EBUSY;
  int console = dev_ok ? open("/dev/console", O_RDWR | O_NOCTTY) : -1;
  if (console >= 0) {
    dup2(console, STDIN_FILENO);
    dup2(console, STDOUT_FILENO);
    dup2(console, STDERR_FILENO);
    if (console > STDERR_FILENO) close(console);
  }
  if (!dev_ok) say("mount devtmpfs failed: %s", strerror(errno));
  if (mount("proc", "/proc", "proc", 0, "") != 0) say("mount proc failed: %s", strerror(errno));
  if (mount("sysfs", "/sys", "sysfs", 0, "") != 0) say("mount sysfs failed: %s", strerror(errno));
}

// Loads each module named in MODULE_LIST, in file order (the builder wrote them in dependency
// order: virtio_ring, virtio, the transports, then the drivers). finit_module takes the module
// from an fd, so no module loader (kmod) is needed in the initramfs.
static int load_modules(void) {
  FILE *list = fopen(MODULE_LIST, "r");
  if (!list) {
    say("no %s: loading no modules", MODULE_LIST);
    return 0;
  }
  char path[256];
  int failures = 0;
  while (fgets(path, sizeof(path), list)) {
    path[strcspn(path, "\n")] = 0;
    if (path[0] == 0) continue;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      say("module %s: open failed: %s", path, strerror(errno));
      failures++;
      continue;
    }
    if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) {
      say("module %s: finit_module failed: %s", path, strerror(errno));
      failures++;
    }
    close(fd);
  }
  fclose(list);
  return failures;
}

// Value of `key=` on the kernel command line, copied into out; 0 if absent.
static int cmdline_value(const char *key, char *out, size_t out_size) {
  char cmdline[4096];
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd < 0) return 0;
  ssize_t n = read(fd, cmdline, sizeof(cmdline) - 1);
  close(fd);
  if (n <= 0) return 0;
  cmdline[n] = 0;
  size_t key_len = strlen(key);
  for (char *word = strtok(cmdline, " \n"); word; word = strtok(NULL, " \n")) {
    if (strncmp(word, key, key_len) == 0 && word[key_len] == '=') {
      snprintf(out, out_size, "%s", word + key_len + 1);
      return 1;
    }
  }
  return 0;
}

static void fill_pattern_block(uint8_t *block, uint64_t b) {
  for (int k = 0; k < 8; k++) block[k] = (uint8_t)(PATTERN_MAGIC >> (8 * k));
  for (int k = 0; k < 8; k++) block[8 + k] = (uint8_t)(b >> (8 * k));
  for (uint64_t i = 16; i < TEST_BLOCK_SIZE; i++) block[i] = (uint8_t)((b * 31 + i * 7) & 0xff);
}

static double seconds_since(const struct timespec *start) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

// The device node appears when virtio_blk has probed the device, which happens asynchronously
// after the module load returns.
static int wait_for_disk(const char *path) {
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  struct stat st;
  while (seconds_since(&start) < DISK_WAIT_SECONDS) {
    if (stat(path, &st) == 0 && S_ISBLK(st.st_mode)) return 1;
    usleep(50 * 1000);
  }
  return 0;
}

static void blk_test(void) {
  const char *disk = "/dev/vda";
  char value[32];
  unsigned long blocks = DEFAULT_BLOCKS;
  if (cmdline_value("vmmblocks", value, sizeof(value))) {
    char *end;
    errno = 0;
    blocks = strtoul(value, &end, 10);
    if (errno || *end || blocks == 0 || blocks > (1UL << 24)) {
      say("blk FAIL bad vmmblocks=%s", value);
      return;
    }
  }
  if (!wait_for_disk(disk)) {
    say("blk FAIL %s did not appear within %d s", disk, DISK_WAIT_SECONDS);
    return;
  }
  // O_DIRECT: the I/O must reach the device, not stop in the guest's page cache.
  int fd = open(disk, O_RDWR | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    say("blk FAIL open %s: %s", disk, strerror(errno));
    return;
  }
  uint64_t disk_bytes = 0;
  if (ioctl(fd, BLKGETSIZE64, &disk_bytes) != 0) {
    say("blk FAIL BLKGETSIZE64: %s", strerror(errno));
    close(fd);
    return;
  }
  if (disk_bytes / TEST_BLOCK_SIZE < blocks) {
    say("blk FAIL disk has %llu bytes, fewer than %lu blocks", (unsigned long long)disk_bytes,
        blocks);
    close(fd);
    return;
  }
  uint8_t *expected = NULL, *actual = NULL;  // O_DIRECT needs aligned buffers
  if (posix_memalign((void **)&expected, TEST_BLOCK_SIZE, TEST_BLOCK_SIZE) ||
      posix_memalign((void **)&actual, TEST_BLOCK_SIZE, TEST_BLOCK_SIZE)) {
    say("blk FAIL out of memory");
    close(fd);
    return;
  }
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  unsigned long written = 0, verified = 0;
  for (uint64_t b = 0; b < blocks; b++) {
    fill_pattern_block(expected, b);
    ssize_t n = pwrite(fd, expected, TEST_BLOCK_SIZE, (off_t)(b * TEST_BLOCK_SIZE));
    if (n != TEST_BLOCK_SIZE) {
      say("blk FAIL write block %llu: %s", (unsigned long long)b,
          n < 0 ? strerror(errno) : "short write");
      goto out;
    }
    written++;
  }
  if (fsync(fd) != 0) {  // a virtio-blk FLUSH request
    say("blk FAIL fsync: %s", strerror(errno));
    goto out;
  }
  for (uint64_t b = 0; b < blocks; b++) {
    fill_pattern_block(expected, b);
    ssize_t n = pread(fd, actual, TEST_BLOCK_SIZE, (off_t)(b * TEST_BLOCK_SIZE));
    if (n != TEST_BLOCK_SIZE) {
      say("blk FAIL read block %llu: %s", (unsigned long long)b,
          n < 0 ? strerror(errno) : "short read");
      goto out;
    }
    if (memcmp(expected, actual, TEST_BLOCK_SIZE) != 0) {
      say("blk FAIL block %llu differs from the pattern", (unsigned long long)b);
      goto out;
    }
    verified++;
  }
  say("blk I/O took %.2f s", seconds_since(&start));
  say("blk OK wrote=%lu verified=%lu", written, verified);
out:
  free(expected);
  free(actual);
  close(fd);
}

int main(void) {
  mount_early_filesystems();
  say("reached /init");
  int module_failures = load_modules();
  char test[32] = "";
  cmdline_value("vmmtest", test, sizeof(test));
  if (strcmp(test, "boot") == 0) {
    if (module_failures)
      say("boot FAIL %d module(s) did not load", module_failures);
    else
      say("boot OK");
  } else if (strcmp(test, "blk") == 0) {
    blk_test();
  } else {
    say("unknown vmmtest=%s (expected boot or blk)", test);
  }
  power_off();
  return 0;
}

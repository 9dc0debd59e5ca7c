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
//   vmmrounds=R    the blk test becomes a loop of R rounds (see blk_rounds_test): W writers, each
//                  round writes every block with a round-specific pattern, fsyncs, reads back and
//                  verifies; long enough for a host to kill and restart the backend meanwhile
//   vmmwriters=W   processes doing that loop, on disjoint block ranges (default 4)
//   vmmchunk=C     blocks per pwrite/pread of the loop (default 16, i.e. 64 KiB)
//   vmmstall=S     the loop fails if no writer makes progress for S seconds (default 60)
//
// Either blk test then scans the kernel log (/dev/kmsg) for block-layer errors ("I/O error",
// "blk_update_request", "critical", "Buffer I/O") and fails if it finds any.
//
// The blk pattern (also checked on the host by check-pattern.py): block b holds the 8-byte
// little-endian magic 0x3158554E494C4D56 ("VMLINUX1"), then b as a little-endian u64, then for
// each byte offset i in 16..4096 the byte (b*31 + i*7) & 0xff. Every block differs, so a device
// that writes to the wrong sector or returns stale data is caught.
//
// The rounds pattern (check-pattern.py --round R): block b of round r holds the magic
// 0x31444E554F524D56 ("VMROUND1"), b, r (little-endian u64 each), then for each byte offset i in
// 24..4096 the byte (b*31 + i*7 + r*113) & 0xff. A write replayed from an earlier round (a backend
// resubmitting a request the guest already saw complete) leaves a block naming the wrong round.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TEST_BLOCK_SIZE 4096
#define PATTERN_MAGIC 0x3158554E494C4D56ULL /* "VMLINUX1" read as little-endian */
#define ROUND_MAGIC 0x31444E554F524D56ULL   /* "VMROUND1" read as little-endian */
#define DEFAULT_BLOCKS 256
#define DEFAULT_WRITERS 4
#define MAX_WRITERS 64
#define DEFAULT_CHUNK_BLOCKS 16
#define MAX_CHUNK_BLOCKS 1024
#define DEFAULT_STALL_SECONDS 60
#define DISK_WAIT_SECONDS 30
#define MODULE_LIST "/etc/modules-load" /* written by the asset builder, one path a line */

static void say(const char *fmt, ...) {
  char line[512] = "VMM-INIT: ";
  const size_t prefix = 10;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line + prefix, sizeof(line) - prefix - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  size_t len = prefix + (size_t)n;
  if (len > sizeof(line) - 2) len = sizeof(line) - 2;
  line[len++] = '\n';
  // One write per line, so kernel messages printed meanwhile (or another writer's line)
  // cannot split it.
  (void)!write(STDOUT_FILENO, line, len);
}

// PID 1 must never exit (the kernel panics); every path ends here. After a stalled device,
// sync() could wait for ever, so that path powers off without it.
static int skip_sync_at_power_off;
static void power_off(void) {
  if (!skip_sync_at_power_off) sync();
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

// A number `key=` on the command line in [min, max], or dflt when absent; -1 (after saying why)
// when present but not such a number.
static long cmdline_number(const char *key, long dflt, long min, long max) {
  char value[32];
  if (!cmdline_value(key, value, sizeof(value))) return dflt;
  char *end;
  errno = 0;
  long n = strtol(value, &end, 10);
  if (errno || *end || end == value || n < min || n > max) {
    say("blk FAIL bad %s=%s (want %ld..%ld)", key, value, min, max);
    return -1;
  }
  return n;
}

// Scans the whole kernel log (/dev/kmsg, from the first record still held) for block-layer
// error lines; prints each (at most 10) and returns how many were found, or -1 if the log could
// not be read.
static int kernel_log_errors(void) {
  static const char *const needles[] = {"I/O error", "blk_update_request", "critical",
                                        "Buffer I/O"};
  int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    say("cannot open /dev/kmsg: %s", strerror(errno));
    return -1;
  }
  char record[8192];
  int found = 0, records = 0;
  for (;;) {
    ssize_t n = read(fd, record, sizeof(record) - 1);
    if (n < 0 && errno == EPIPE) continue;  // overwritten while we read: go on with the next
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;                       // EAGAIN: the end of the log
    if (n == 0) break;
    record[n] = 0;
    records++;
    // "prio,seq,usec,flags;message\n" then optional " KEY=value" continuation lines.
    char *message = strchr(record, ';');
    message = message ? message + 1 : record;
    message[strcspn(message, "\n")] = 0;
    for (size_t k = 0; k < sizeof(needles) / sizeof(needles[0]); k++) {
      if (strstr(message, needles[k])) {
        if (found < 10) say("kernel log: %s", message);
        found++;
        break;
      }
    }
  }
  close(fd);
  if (records == 0) {
    say("/dev/kmsg gave no records");
    return -1;
  }
  return found;
}

// Fails the blk test (returns 0) if the kernel log shows a block-layer error.
static int kernel_log_clean(void) {
  int errors = kernel_log_errors();
  if (errors < 0) {
    say("blk FAIL cannot read the kernel log");
    return 0;
  }
  if (errors > 0) {
    say("blk FAIL kernel log shows %d block I/O error line(s)", errors);
    return 0;
  }
  say("blk kernel log clean (none of its lines names a block error)");
  return 1;
}

static void fill_round_block(uint8_t *block, uint64_t b, uint64_t round) {
  for (int k = 0; k < 8; k++) block[k] = (uint8_t)(ROUND_MAGIC >> (8 * k));
  for (int k = 0; k < 8; k++) block[8 + k] = (uint8_t)(b >> (8 * k));
  for (int k = 0; k < 8; k++) block[16 + k] = (uint8_t)(round >> (8 * k));
  uint8_t v = (uint8_t)(b * 31 + 24 * 7 + round * 113);
  for (int i = 24; i < TEST_BLOCK_SIZE; i++, v += 7) block[i] = v;
}

static uint64_t le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int k = 7; k >= 0; k--) v = (v << 8) | p[k];
  return v;
}

// What one writer has done, in memory shared with PID 1 (MAP_SHARED | MAP_ANONYMOUS).
struct writer_progress {
  volatile unsigned long rounds_done;
  volatile unsigned long blocks_written;
  volatile unsigned long blocks_verified;
  volatile int failed;
};

// One writer: rounds over blocks [first, first + count) of fd, chunk blocks per request.
static int round_writer(int fd, int id, uint64_t first, uint64_t count, unsigned long rounds,
                        unsigned long chunk, struct writer_progress *progress) {
  size_t bytes = chunk * TEST_BLOCK_SIZE;
  uint8_t *expected = NULL, *actual = NULL;  // O_DIRECT needs aligned buffers
  if (posix_memalign((void **)&expected, TEST_BLOCK_SIZE, bytes) ||
      posix_memalign((void **)&actual, TEST_BLOCK_SIZE, bytes)) {
    say("blk FAIL writer %d: out of memory", id);
    return 1;
  }
  for (unsigned long round = 1; round <= rounds; round++) {
    for (uint64_t b = first; b < first + count; b += chunk) {
      uint64_t n_blocks = first + count - b < chunk ? first + count - b : chunk;
      for (uint64_t k = 0; k < n_blocks; k++)
        fill_round_block(expected + k * TEST_BLOCK_SIZE, b + k, round);
      size_t len = n_blocks * TEST_BLOCK_SIZE;
      ssize_t n = pwrite(fd, expected, len, (off_t)(b * TEST_BLOCK_SIZE));
      if (n != (ssize_t)len) {
        say("blk FAIL writer %d round %lu: write blocks %llu..%llu: %s", id, round,
            (unsigned long long)b, (unsigned long long)(b + n_blocks - 1),
            n < 0 ? strerror(errno) : "short write");
        return 1;
      }
      progress->blocks_written += n_blocks;
    }
    if (fsync(fd) != 0) {  // a virtio-blk FLUSH request, concurrent with the others' writes
      say("blk FAIL writer %d round %lu: fsync: %s", id, round, strerror(errno));
      return 1;
    }
    for (uint64_t b = first; b < first + count; b += chunk) {
      uint64_t n_blocks = first + count - b < chunk ? first + count - b : chunk;
      size_t len = n_blocks * TEST_BLOCK_SIZE;
      ssize_t n = pread(fd, actual, len, (off_t)(b * TEST_BLOCK_SIZE));
      if (n != (ssize_t)len) {
        say("blk FAIL writer %d round %lu: read blocks %llu..%llu: %s", id, round,
            (unsigned long long)b, (unsigned long long)(b + n_blocks - 1),
            n < 0 ? strerror(errno) : "short read");
        return 1;
      }
      for (uint64_t k = 0; k < n_blocks; k++) {
        uint8_t *want = expected, *got = actual + k * TEST_BLOCK_SIZE;
        fill_round_block(want, b + k, round);
        if (memcmp(want, got, TEST_BLOCK_SIZE) != 0) {
          int at = 0;
          while (at < TEST_BLOCK_SIZE && want[at] == got[at]) at++;
          say("blk FAIL writer %d round %lu: block %llu differs at byte %d (it holds magic "
              "%#llx, block %llu, round %llu)",
              id, round, (unsigned long long)(b + k), at, (unsigned long long)le64(got),
              (unsigned long long)le64(got + 8), (unsigned long long)le64(got + 16));
          return 1;
        }
      }
      progress->blocks_verified += n_blocks;
    }
    progress->rounds_done = round;
  }
  return 0;
}

// vmmrounds=R: W writer processes (fork, so the kernel sees W independent submitters and keeps
// several requests in flight, more where a chunk is split), each on its own range of blocks,
// R rounds each of: write every block with round r's pattern, fsync, read back and verify.
// PID 1 watches their progress, prints a line per completed round, and fails the test if none
// moves for vmmstall seconds (a request lost by the backend leaves a writer waiting for ever).
static void blk_rounds_test(int fd, unsigned long blocks, unsigned long rounds) {
  long writers = cmdline_number("vmmwriters", DEFAULT_WRITERS, 1, MAX_WRITERS);
  long chunk = cmdline_number("vmmchunk", DEFAULT_CHUNK_BLOCKS, 1, MAX_CHUNK_BLOCKS);
  long stall_s = cmdline_number("vmmstall", DEFAULT_STALL_SECONDS, 1, 3600);
  if (writers < 0 || chunk < 0 || stall_s < 0) return;
  if ((unsigned long)writers > blocks) writers = (long)blocks;
  struct writer_progress *progress =
      mmap(NULL, sizeof(*progress) * (size_t)writers, PROT_READ | PROT_WRITE,
           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (progress == MAP_FAILED) {
    say("blk FAIL mmap: %s", strerror(errno));
    return;
  }
  memset(progress, 0, sizeof(*progress) * (size_t)writers);
  pid_t pids[MAX_WRITERS];
  struct timespec start;
  clock_gettime(CLOCK_MONOTONIC, &start);
  // The host's kill harness waits for this line before it starts killing the backend.
  say("blk loop start rounds=%lu blocks=%lu writers=%ld chunk=%ld", rounds, blocks, writers,
      chunk);
  long started = 0;
  for (long w = 0; w < writers; w++) {
    uint64_t first = blocks * (uint64_t)w / (uint64_t)writers;
    uint64_t next = blocks * (uint64_t)(w + 1) / (uint64_t)writers;
    pid_t pid = fork();
    if (pid == 0) {
      int status = round_writer(fd, (int)w, first, next - first, rounds, (unsigned long)chunk,
                                &progress[w]);
      if (status) progress[w].failed = 1;
      _exit(status);
    }
    if (pid < 0) {
      say("blk FAIL fork: %s", strerror(errno));
      break;
    }
    pids[started++] = pid;
  }
  int running = (int)started, failed = started < writers;
  unsigned long shown_round = 0, last_total = 0;
  double last_progress = 0;
  while (running > 0) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      running--;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
      continue;
    }
    unsigned long min_round = rounds, total = 0;
    for (long w = 0; w < started; w++) {
      if (progress[w].rounds_done < min_round) min_round = progress[w].rounds_done;
      total += progress[w].blocks_written + progress[w].blocks_verified;
    }
    double now = seconds_since(&start);
    if (min_round > shown_round) {
      shown_round = min_round;
      say("blk round %lu/%lu done at %.2f s", shown_round, rounds, now);
    }
    if (total != last_total) {
      last_total = total;
      last_progress = now;
    } else if (now - last_progress > (double)stall_s) {
      say("blk FAIL no writer made progress for %ld s (%d still waiting; a request lost?)",
          stall_s, running);
      for (long w = 0; w < started; w++)
        say("blk writer %ld: rounds=%lu written=%lu verified=%lu", w, progress[w].rounds_done,
            progress[w].blocks_written, progress[w].blocks_verified);
      kernel_log_errors();
      for (long w = 0; w < started; w++) kill(pids[w], SIGKILL);
      skip_sync_at_power_off = 1;
      return;
    }
    usleep(100 * 1000);
  }
  unsigned long written = 0, verified = 0, rounds_done = rounds;
  for (long w = 0; w < started; w++) {
    written += progress[w].blocks_written;
    verified += progress[w].blocks_verified;
    if (progress[w].rounds_done < rounds_done) rounds_done = progress[w].rounds_done;
  }
  say("blk loop done at %.2f s: rounds=%lu/%lu blocks=%lu wrote=%lu verified=%lu",
      seconds_since(&start), rounds_done, rounds, blocks, written, verified);
  if (failed) {
    say("blk FAIL a writer failed (see its line above)");
    return;
  }
  if (!kernel_log_clean()) return;
  say("blk OK rounds=%lu blocks=%lu wrote=%lu verified=%lu", rounds_done, blocks, written,
      verified);
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
  long rounds = cmdline_number("vmmrounds", 0, 1, 1000000);
  if (rounds < 0) {
    close(fd);
    return;
  }
  if (rounds > 0) {
    blk_rounds_test(fd, blocks, (unsigned long)rounds);
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
  if (!kernel_log_clean()) goto out;
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

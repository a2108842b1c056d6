/*
 * Reference paravisor ("VTL2") and guest-OS agent ("VTL0") of the testbed lab.
 *
 * One static binary, several "images": the image name is the basename of
 * argv[0] (the initramfs links /lib/testbed/images/<name> to this file), so a
 * servicing request can exec "another paravisor version" that really is a
 * different program image with different behaviour:
 *
 *   v1         no pause_resume feature (falls back to mask, like pre-#962)
 *   v2         pause_resume feature (the #962 protocol)
 *   v2-replay  faulty: replays its saved queue twice after restore
 *   v2-panic   faulty: panics the guest kernel during restore
 *   v2-hang    faulty: never finishes restore
 *   v2-crash   faulty: crashes as soon as it starts restoring
 *   v2-skip    faulty target: the running paravisor reports servicing into it
 *              as done (ok=1) without saving, closing or exec'ing anything: the
 *              "servicing that silently did not happen" of openvmm #2698
 *
 * Every start of a paravisor image (first boot, or after exec) draws a new boot
 * id and announces it in HELLO: servicing that really happened re-offers the IC
 * with a boot id the host has not seen, one that did not cannot.
 *
 * Ports (virtio-serial, found by name in /sys/class/virtio-ports):
 *   vmbus  the vmbus message channel; closing it is the "synic reset": the
 *          guest kernel's virtio_console discards bytes it holds for the port.
 *   get    the guest-emulation transport: servicing requests and reports, and
 *          the out-of-band mask signal.
 *
 * Wire format: one line per message, space separated, key=value fields.
 * Every line the guest prints on the serial console starts with "TB " so the
 * host can tell lab evidence from kernel noise.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STATE_PATH "/run/paravisor.state"
#define IMAGE_DIR "/lib/testbed/images/"
#define MAXQ 64
#define LINE 512

static int serial_fd = -1;
static char image[64];

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Evidence on the serial console: survives until the VM ends. */
static void evidence(const char *fmt, ...) {
    char buf[LINE];
    int n = snprintf(buf, sizeof buf, "TB t=%lld ", (long long)now_us());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (serial_fd >= 0) (void)!write(serial_fd, buf, n);
}

static void sendline(int fd, const char *fmt, ...) {
    char buf[LINE];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (fd >= 0) (void)!write(fd, buf, n);
}

/* field("seq", "MSG seq=3 id=1") -> "3" (one of 8 rotating static buffers) */
static const char *field(const char *key, const char *line) {
    static char bufs[8][128];
    static int next;
    char *out = bufs[next++ % 8];
    size_t k = strlen(key);
    const char *p = line;
    while ((p = strstr(p, key)) != NULL) {
        if ((p == line || p[-1] == ' ') && p[k] == '=') {
            p += k + 1;
            size_t i = 0;
            while (p[i] && p[i] != ' ' && p[i] != '\n' && i < sizeof bufs[0] - 1) {
                out[i] = p[i];
                i++;
            }
            out[i] = 0;
            return out;
        }
        p += k;
    }
    return "";
}

static int starts(const char *line, const char *word) {
    size_t n = strlen(word);
    return strncmp(line, word, n) == 0 && (line[n] == ' ' || line[n] == 0 || line[n] == '\n');
}

/* ---- line reader ------------------------------------------------------ */
struct reader {
    int fd;
    char buf[8192];
    size_t len;
};

/* Returns 1 with a line, 0 when no full line is buffered. */
static int take_line(struct reader *r, char *out) {
    char *nl = memchr(r->buf, '\n', r->len);
    if (!nl) return 0;
    size_t n = nl - r->buf;
    if (n >= LINE) n = LINE - 1;
    memcpy(out, r->buf, n);
    out[n] = 0;
    size_t used = (size_t)(nl - r->buf) + 1;
    memmove(r->buf, r->buf + used, r->len - used);
    r->len -= used;
    return 1;
}

/* Reads what is available; returns -1 on EOF/error. */
static int fill(struct reader *r) {
    if (r->len >= sizeof r->buf) r->len = 0; /* garbage without newline */
    ssize_t n = read(r->fd, r->buf + r->len, sizeof r->buf - r->len);
    if (n <= 0) return n == 0 || (errno != EAGAIN && errno != EINTR) ? -1 : 0;
    r->len += (size_t)n;
    return 1;
}

/* Waits up to timeout_ms for a line on r. 1 = line, 0 = timeout. */
static int read_line_timeout(struct reader *r, char *out, int timeout_ms) {
    int64_t end = now_us() + (int64_t)timeout_ms * 1000;
    for (;;) {
        if (take_line(r, out)) return 1;
        int64_t left = (end - now_us()) / 1000;
        if (left < 0) return 0;
        struct pollfd p = {.fd = r->fd, .events = POLLIN};
        if (poll(&p, 1, (int)left) > 0 && fill(r) < 0) return 0;
    }
}

/* ---- ports ------------------------------------------------------------ */
static int find_port(const char *name, char *dev, size_t devlen) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char p[300], n[64] = {0};
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(p, O_RDONLY);
        if (fd < 0) continue;
        ssize_t r = read(fd, n, sizeof n - 1);
        close(fd);
        if (r > 0 && n[r - 1] == '\n') n[r - 1] = 0;
        if (strcmp(n, name) == 0) {
            snprintf(dev, devlen, "/dev/%s", e->d_name);
            found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

static int open_port(const char *name) {
    char dev[300];
    for (int i = 0; i < 500; i++) {
        if (find_port(name, dev, sizeof dev) == 0) {
            int fd = open(dev, O_RDWR | O_NONBLOCK);
            if (fd >= 0) return fd;
        }
        usleep(10000);
    }
    return -1;
}

/* ---- paravisor state -------------------------------------------------- */
enum strategy { S_NONE, S_MASK, S_MASK_ASYNC, S_PAUSE_RESUME };
static const char *strategy_names[] = {"none", "mask", "mask-async", "pause-resume"};

struct state {
    int vmbus, get, vtl0;
    int feature_pause_resume; /* negotiated with the host */
    long rx;                  /* next host sequence number expected */
    int nq;
    char queue[MAXQ][LINE]; /* messages held while VTL0 is frozen */
    /* servicing in progress (carried across exec) */
    long svc_id;
    int svc_strategy;
    int restore_ms;
    int attach_ms; /* VTL0's driver attaches this long after the re-offer (the #1174 gap) */
    int regression_pct; /* builds v2-r6 and later: see to_vtl0 */
};

static struct state st;
static int64_t replay_until; /* v2-replay: re-delivers what it relays for a while after restore */
static int64_t attach_at;    /* before this, VTL0 is not listening: what is handed over is dropped */
static int64_t flush_until;  /* builds v2-r6 and later: the flush after a restore drops messages */

/* The bisection series v2-r1 .. v2-r8: one code base, and from r6 on a regression that
 * silently drops st.regression_pct % of the messages handed to VTL0 in the first half
 * second after a restore (those held or queued during servicing): at the default 15 %,
 * a loss at a low rate that a one-shot bisection misses. The servicing request may set
 * it (the lab knob regression_pct); it is carried across exec with the rest of st. */
#define DEFAULT_REGRESSION_PCT 15
static int regressed(void) { return strncmp(image, "v2-r", 4) == 0 && atoi(image + 4) >= 6; }

/* Hand a message to VTL0, unless VTL0's driver has not attached yet after a re-offer:
 * then it is gone, though the host's post was accepted (the shape of openvmm #1174). */
static void to_vtl0(const char *line) {
    if (now_us() < flush_until && rand() % 100 < st.regression_pct) return; /* the regression: silent */
    if (now_us() < attach_at) {
        evidence("PV dropped seq=%s id=%s reason=vtl0-not-attached", field("seq", line), field("id", line));
        return;
    }
    sendline(st.vtl0, "%s", line);
}
static struct reader rv, rg, r0;

static int supports_pause_resume(void) { return strncmp(image, "v2", 2) == 0; }

static char boot_id[17]; /* drawn at every start of an image, never carried across exec */

static void draw_boot_id(void) {
    uint64_t v = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0 || read(fd, &v, sizeof v) != (ssize_t)sizeof v) v = (uint64_t)now_us() * 2654435761u;
    if (fd >= 0) close(fd);
    snprintf(boot_id, sizeof boot_id, "%016llx", (unsigned long long)v);
}

/* Servicing's protocol phases, announced on `get` just before each step is taken, so
 * the host can fire a request at a phase (plus a delay) instead of by timing luck. */
static void phase(const char *name) {
    sendline(st.get, "PHASE name=%s t=%lld", name, (long long)now_us());
}

static void hello(void) {
    sendline(st.vmbus, "HELLO version=%s features=%s rx=%ld boot=%s", image,
             supports_pause_resume() ? "pause_resume" : "-", st.rx, boot_id);
}

/* A message from the host over vmbus while not servicing. */
static void host_message(const char *line, int frozen) {
    if (starts(line, "SYNC")) {
        hello();
    } else if (starts(line, "WELCOME")) {
        st.feature_pause_resume =
            supports_pause_resume() && strstr(field("features", line), "pause_resume");
        evidence("PV negotiated image=%s pause_resume=%d", image, st.feature_pause_resume);
    } else if (starts(line, "MSG")) {
        st.rx = atol(field("seq", line)) + 1;
        if (frozen) {
            if (st.nq < MAXQ) strcpy(st.queue[st.nq++], line);
            evidence("PV queued seq=%s id=%s", field("seq", line), field("id", line));
        } else {
            /* Evidence of the hand-over: VTL0 may log it later, after servicing began. */
            evidence("PV relay seq=%s id=%s", field("seq", line), field("id", line));
            to_vtl0(line);
            if (now_us() < replay_until) { /* the fault: a replayed, already-delivered message */
                evidence("PV replaying seq=%s", field("seq", line));
                to_vtl0(line);
            }
        }
    }
}

static void deliver_queue(int times) {
    for (int t = 0; t < times; t++)
        for (int i = 0; i < st.nq; i++) to_vtl0(st.queue[i]);
    st.nq = 0;
}

static void save_state(void) {
    FILE *f = fopen(STATE_PATH, "w");
    if (!f) return;
    fprintf(f, "%d %d %d %ld %ld %d %d %d %d %d\n", st.get, st.vtl0, st.feature_pause_resume, st.rx,
            st.svc_id, st.svc_strategy, st.restore_ms, st.attach_ms, st.regression_pct, st.nq);
    for (int i = 0; i < st.nq; i++) fprintf(f, "%s\n", st.queue[i]);
    fclose(f);
}

static int load_state(void) {
    FILE *f = fopen(STATE_PATH, "r");
    if (!f) return -1;
    int ok = fscanf(f, "%d %d %d %ld %ld %d %d %d %d %d\n", &st.get, &st.vtl0, &st.feature_pause_resume,
                    &st.rx, &st.svc_id, &st.svc_strategy, &st.restore_ms, &st.attach_ms,
                    &st.regression_pct, &st.nq) == 10;
    if (st.nq > MAXQ) st.nq = MAXQ;
    for (int i = 0; ok && i < st.nq; i++) {
        if (!fgets(st.queue[i], LINE, f)) break;
        st.queue[i][strcspn(st.queue[i], "\n")] = 0;
    }
    fclose(f);
    return ok ? 0 : -1;
}

/* Drain vmbus into the queue until it has been quiet for quiet_ms. */
static void drain_vmbus(int quiet_ms) {
    char line[LINE];
    while (read_line_timeout(&rv, line, quiet_ms)) host_message(line, 1);
}

static void busy_ms(int ms) {
    if (ms > 0) usleep((useconds_t)ms * 1000);
}

static void reopen_and_offer(void) {
    phase("port-reopen");
    st.vmbus = open_port("vmbus");
    rv.fd = st.vmbus;
    rv.len = 0;
    evidence("PV vmbus-open image=%s", image);
    if (st.attach_ms > 0) attach_at = now_us() + (int64_t)st.attach_ms * 1000;
    hello(); /* the re-offer: the host sees the IC come back */
    char line[LINE];
    /* Negotiation: wait for WELCOME, handling anything else that arrives. */
    if (read_line_timeout(&rv, line, 2000)) host_message(line, 1);
}

/* The second half of servicing, run by the new image after exec. */
static void finish_restore(void) {
    if (strcmp(image, "v2-crash") == 0) abort();
    phase("restore-start");
    evidence("PV restore-start image=%s id=%ld", image, st.svc_id);
    busy_ms(st.restore_ms);
    phase("restore-end");
    if (strcmp(image, "v2-panic") == 0) {
        evidence("PV panicking on purpose image=%s", image);
        int fd = open("/proc/sysrq-trigger", O_WRONLY);
        (void)!write(fd, "c", 1);
    }
    if (strcmp(image, "v2-hang") == 0) {
        evidence("PV hanging on purpose image=%s", image);
        for (;;) pause();
    }
    if (strcmp(image, "v2-replay") == 0) replay_until = now_us() + 3000000;
    if (regressed()) flush_until = now_us() + 500000;
    reopen_and_offer();
    if (st.svc_strategy == S_PAUSE_RESUME && supports_pause_resume()) {
        sendline(st.vmbus, "RESUME"); /* v1 knows no Resume: the host flushes on its re-offer */
    } else if (st.svc_strategy == S_MASK || st.svc_strategy == S_MASK_ASYNC) {
        sendline(st.get, "UNMASK");
    }
    evidence("PV svc-done id=%ld image=%s", st.svc_id, image);
    sendline(st.get, "SVC_DONE id=%ld ok=1 image=%s t=%lld", st.svc_id, image,
             (long long)now_us());
    /* VTL0 thaws: held messages first, then whatever the host flushes. */
    deliver_queue(replay_until ? 2 : 1);
}

static void servicing(const char *req) {
    st.svc_id = atol(field("id", req));
    const char *img = field("image", req);
    char target[64];
    snprintf(target, sizeof target, "%s", *img ? img : image);
    const char *s = field("strategy", req);
    int strat = S_NONE;
    for (int i = 0; i < 4; i++)
        if (strcmp(s, strategy_names[i]) == 0) strat = i;
    int save_ms = atoi(field("save_ms", req));
    int blackout_ms = atoi(field("blackout_ms", req));
    st.restore_ms = atoi(field("restore_ms", req));
    st.attach_ms = atoi(field("attach_ms", req));
    const char *pct = field("regression_pct", req);
    st.regression_pct = *pct ? atoi(pct) : DEFAULT_REGRESSION_PCT;

    sendline(st.get, "SVC_START id=%ld t=%lld", st.svc_id, (long long)now_us());
    evidence("PV svc-start id=%ld from=%s to=%s strategy=%s", st.svc_id, image, target, s);

    if (strcmp(target, "v2-skip") == 0) { /* faulty: acknowledge, do nothing */
        evidence("PV svc-done id=%ld image=%s (skipped on purpose)", st.svc_id, target);
        sendline(st.get, "SVC_DONE id=%ld ok=1 image=%s t=%lld", st.svc_id, target, (long long)now_us());
        return;
    }

    /* Negotiated fallback: pause-resume needs the feature on this channel. */
    if (strat == S_PAUSE_RESUME && !st.feature_pause_resume) {
        strat = S_MASK;
        evidence("PV fallback strategy=mask reason=no-pause_resume-feature");
    }
    st.svc_strategy = strat;
    char line[LINE];
    if (strat == S_PAUSE_RESUME) {
        phase("quiesce");
        sendline(st.vmbus, "PAUSE");
        /* In-band: everything before PauseResponse is ours to keep. */
        while (read_line_timeout(&rv, line, 5000)) {
            if (starts(line, "PAUSE_RESPONSE")) break;
            host_message(line, 1);
        }
        phase("quiesce-acked");
        evidence("PV paused");
    } else if (strat == S_MASK || strat == S_MASK_ASYNC) {
        phase("quiesce");
        sendline(st.get, "MASK");
        if (strat == S_MASK) { /* the host must acknowledge before we drain */
            while (read_line_timeout(&rg, line, 5000))
                if (starts(line, "MASK_ACK")) break;
            phase("quiesce-acked");
        }
        /* mask: the host has stopped posting (MASK_ACK), so wait out what is
         * already in flight. mask-async: the host learns of the mask later;
         * drain only what has arrived, the residual window is the finding. */
        drain_vmbus(strat == S_MASK ? 2 : 0);
        phase("drained");
        evidence("PV masked drained=%d", st.nq);
    }
    /* S_NONE: stop reading; whatever lands now is at the mercy of the close. */

    int jitter = blackout_ms > 0 ? rand() % (blackout_ms + 1) : 0;
    phase("save-start");
    busy_ms(save_ms + jitter);
    save_state();
    phase("save-end");
    phase("port-close");
    sendline(st.vmbus, "CLOSING"); /* the channel goes away (rescind) */
    close(st.vmbus); /* synic reset: the kernel discards unread bytes */
    st.vmbus = -1;
    evidence("PV vmbus-closed id=%ld", st.svc_id);

    char path[128];
    snprintf(path, sizeof path, IMAGE_DIR "%s", target);
    char *argv[] = {path, "--restore", NULL};
    phase("exec");
    execv(path, argv);
    /* exec failed: the old image stays, restores itself, the VM is unharmed */
    int err = errno;
    evidence("PV svc-fail id=%ld reason=exec-failed errno=%d", st.svc_id, err);
    reopen_and_offer();
    if (strat == S_PAUSE_RESUME) sendline(st.vmbus, "RESUME");
    if (strat == S_MASK || strat == S_MASK_ASYNC) sendline(st.get, "UNMASK");
    sendline(st.get, "SVC_DONE id=%ld ok=0 reason=exec-failed errno=%d t=%lld", st.svc_id, err,
             (long long)now_us());
    deliver_queue(1);
}

static int paravisor_loop(void) {
    char line[LINE];
    for (;;) {
        /* Lines already buffered first (e.g. read while waiting for WELCOME):
         * poll() only reports what is still in the kernel. */
        while (take_line(&rv, line)) host_message(line, 0);
        while (take_line(&r0, line)) sendline(st.vmbus, "%s", line); /* VTL0 acks */
        while (take_line(&rg, line)) {
            if (starts(line, "SERVICE")) servicing(line);
            if (starts(line, "UNAME")) { /* the host reads the guest kernel back */
                struct utsname u;
                uname(&u);
                sendline(st.get, "UNAME release=%s machine=%s image=%s", u.release, u.machine, image);
            }
        }
        struct pollfd p[3] = {{st.vmbus, POLLIN, 0}, {st.get, POLLIN, 0}, {st.vtl0, POLLIN, 0}};
        if (poll(p, 3, -1) < 0) continue;
        /* A port whose host side is not connected polls as HUP: back off. */
        if ((p[0].revents | p[1].revents) & POLLHUP &&
            !((p[0].revents | p[1].revents) & POLLIN))
            usleep(5000);
        if (p[0].revents & POLLIN) fill(&rv);
        if (p[1].revents & POLLIN) fill(&rg);
        if (p[2].revents & (POLLIN | POLLHUP)) {
            if (fill(&r0) < 0) return 0;
        }
    }
}

/* ---- VTL0: the guest OS ------------------------------------------------ */
/* Open every evdev node: which one is the ACPI power button depends on the machine. */
static int open_inputs(struct pollfd *p, int max) {
    int n = 0;
    for (int i = 0; i < 16 && n < max; i++) {
        char path[64];
        snprintf(path, sizeof path, "/dev/input/event%d", i);
        int fd = open(path, O_RDONLY | O_NONBLOCK);
        if (fd >= 0) p[n++] = (struct pollfd){fd, POLLIN, 0};
    }
    return n;
}

static void vtl0_main(int fd, int shutdown_ms) {
    struct reader r = {.fd = fd};
    struct pollfd p[9];
    int ninputs = open_inputs(p + 1, 8);
    int64_t poweroff_at = 0;
    /* Traffic the other way: after a host MSG type=stream, `count` lines TX seq=N every
     * `interval_us`, so the host can account for every guest -> host message too. */
    int64_t tx_next = 0, tx_interval = 0;
    long tx_seq = 0, tx_left = 0;
    char line[LINE];
    evidence("VTL0 up inputs=%d", ninputs);
    sendline(fd, "UP"); /* READY waits for this: VTL0 can take a power button now */
    for (;;) {
        p[0] = (struct pollfd){fd, POLLIN, 0};
        int timeout = -1;
        if (poweroff_at) {
            int64_t left = (poweroff_at - now_us()) / 1000;
            if (left <= 0) {
                evidence("VTL0 poweroff");
                sync();
                reboot(LINUX_REBOOT_CMD_POWER_OFF);
            }
            timeout = (int)left;
        }
        if (tx_left > 0 && fd >= 0) {
            int64_t now = now_us();
            while (tx_left > 0 && now >= tx_next) {
                sendline(fd, "TX seq=%ld t=%lld", tx_seq++, (long long)now);
                tx_left--;
                tx_next += tx_interval;
            }
            if (tx_left > 0) {
                int wait = (int)((tx_next - now + 999) / 1000);
                if (timeout < 0 || wait < timeout) timeout = wait;
            }
        }
        if (poll(p, 1 + ninputs, timeout) <= 0) continue;
        for (int i = 1; i <= ninputs; i++) {
            if (!(p[i].revents & POLLIN)) continue;
            struct input_event ev;
            while (read(p[i].fd, &ev, sizeof ev) == sizeof ev)
                if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1 && !poweroff_at) {
                    evidence("VTL0 power-button");
                    poweroff_at = now_us();
                }
        }
        if ((p[0].revents & (POLLIN | POLLHUP)) && fill(&r) < 0) fd = -1;
        while (take_line(&r, line)) {
            if (!starts(line, "MSG")) continue;
            char seq[64], id[64];
            snprintf(seq, sizeof seq, "%s", field("seq", line));
            snprintf(id, sizeof id, "%s", field("id", line));
            char type[32];
            snprintf(type, sizeof type, "%s", field("type", line));
            if (strcmp(type, "shutdown") == 0) {
                evidence("VTL0 SHUTDOWN id=%s seq=%s reason=%s", id, seq, field("reason", line));
                sendline(fd, "ACK seq=%s id=%s t=%lld", seq, id, (long long)now_us());
                if (!poweroff_at) poweroff_at = now_us() + (int64_t)shutdown_ms * 1000;
            } else if (strcmp(type, "hb") == 0) { /* a stream message: acknowledged, nothing else */
                sendline(fd, "ACK seq=%s id=%s t=%lld", seq, id, (long long)now_us());
            } else if (strcmp(type, "stream") == 0) {
                tx_interval = atol(field("interval_us", line));
                tx_left = atol(field("count", line));
                if (tx_interval < 500) tx_interval = 500;
                tx_next = now_us();
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *base = strrchr(argv[0], '/');
    snprintf(image, sizeof image, "%s", base ? base + 1 : argv[0]);
    draw_boot_id();
    serial_fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
    srand((unsigned)now_us());
    signal(SIGPIPE, SIG_IGN);

    if (argc > 1 && strcmp(argv[1], "--restore") == 0) {
        if (load_state() < 0) {
            evidence("PV restore-failed reason=no-state image=%s", image);
            return 1;
        }
        rg.fd = st.get;
        r0.fd = st.vtl0;
        finish_restore();
        return paravisor_loop();
    }

    /* First boot: start VTL0, open both ports, offer the shutdown IC. */
    int shutdown_ms = argc > 1 ? atoi(argv[1]) : 100;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        vtl0_main(sv[1], shutdown_ms);
        _exit(0);
    }
    close(sv[1]);
    st.vtl0 = sv[0];
    st.get = open_port("get");
    st.rx = 0;
    rg.fd = st.get;
    r0.fd = st.vtl0;
    st.vmbus = open_port("vmbus");
    rv.fd = st.vmbus;
    if (st.get < 0 || st.vmbus < 0) {
        evidence("PV ports-missing get=%d vmbus=%d", st.get, st.vmbus);
        return 1;
    }
    hello();
    char up[LINE];
    if (!read_line_timeout(&r0, up, 10000) || !starts(up, "UP")) evidence("PV vtl0-not-up");
    evidence("PV ready image=%s", image);
    evidence("READY");
    return paravisor_loop();
}

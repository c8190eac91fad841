/* enforcer-cni: a chained CNI plugin that hands every new pod sandbox to the node's enforcer.
 *
 * The container runtime runs it after the interface plugin (bridge, calico, ...) while it creates
 * a pod's sandbox, before any container of the pod starts. It forwards the CNI_* variables and the
 * netconf (stdin, which holds the chain's prevResult) to the enforcer over a unix socket and
 * prints what the enforcer answers. It parses no JSON beyond one top-level key scan and keeps
 * every buffer static and bounded; each step has a deadline (poll()).
 *
 * Wire format (enforcer/run/cni.py is the other end; both ends share these constants):
 *   request  = u32 big-endian N, then N bytes: 0x01 (protocol version), zero or more
 *              "NAME=VALUE\0" entries (only the CNI_* variables listed below), one "\0", then
 *              the netconf exactly as read from stdin.
 *   reply    = u32 big-endian N, then N bytes: the exit code (0 or 1), then the bytes to print.
 *
 * Enforcer unreachable (no socket, refused, deadline passed, malformed reply):
 *   ADD, STATUS -> CNI error 11 ("try again later") on stdout, exit 1: the runtime fails the
 *                  sandbox and kubelet retries, so no pod starts while the enforcer is away;
 *   DEL, CHECK, GC -> exit 0: tearing a pod down never waits for the enforcer.
 * VERSION is answered here. The enforcer's own pod runs with hostNetwork, so the runtime never
 * calls CNI for it: restarting the enforcer cannot deadlock on this plugin.
 *
 * netconf keys read here (top level only; a same-named key inside prevResult is never taken):
 *   "socket": absolute path, characters [A-Za-z0-9/._-] (default /var/run/enforcer/cni.sock)
 *   "timeout": whole seconds for the whole exchange, 1..600 (default 30)
 *   "cniVersion": echoed in the error object
 *
 * Build: gcc -static -Os -s -o enforcer-cni enforcer-cni.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/var/run/enforcer/cni.sock"
#define DEFAULT_TIMEOUT_S 30
#define MAX_TIMEOUT_S 600
#define PROTOCOL_VERSION 1
#define NETCONF_MAX (256 * 1024)      /* stdin; a conflist's prevResult is a few KB */
#define ENV_MAX (16 * 1024)           /* the forwarded variables, all together */
#define REQUEST_MAX (1 + ENV_MAX + 1 + NETCONF_MAX)
#define REPLY_MAX (512 * 1024)
#define SUPPORTED "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"

static const char *const FORWARDED[] = {
    "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
};

static char netconf[NETCONF_MAX + 1];
static unsigned char request[4 + REQUEST_MAX];
static unsigned char reply[REPLY_MAX];
static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char cni_version[16] = "1.0.0";
static const char *command = "";

/* ------------------------------------------------------------------ output */

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Copies `in` into `out` with anything that could break a JSON string replaced by '?'. */
static void json_safe(char *out, size_t outsz, const char *in) {
    size_t i = 0;
    for (; in[i] && i + 1 < outsz; i++) {
        unsigned char c = (unsigned char)in[i];
        out[i] = (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') ? '?' : (char)c;
    }
    out[i] = '\0';
}

/* A CNI error object on stdout (the runtime shows msg and details in the pod's events), a line on
 * stderr for the runtime's log, exit 1. A DEL never fails: it only logs, so teardown goes on. */
static void fail(int code, const char *msg, const char *details) {
    if (strcmp(command, "DEL") == 0) {
        fprintf(stderr, "enforcer-cni DEL: %s: %s (nothing to undo here)\n", msg, details);
        exit(0);
    }
    char m[256], d[512], out[1024];
    json_safe(m, sizeof m, msg);
    json_safe(d, sizeof d, details);
    int n = snprintf(out, sizeof out, "{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\",\"details\":\"%s\"}\n",
                     cni_version, code, m, d);
    if (n > 0) write_all(1, out, (size_t)n < sizeof out ? (size_t)n : sizeof out - 1);
    fprintf(stderr, "enforcer-cni %s: %s: %s\n", command, msg, details);
    exit(1);
}

/* The enforcer could not be asked: fail closed on ADD (and STATUS), never block a teardown. */
static void unreachable(const char *why) {
    char details[512];
    snprintf(details, sizeof details, "socket %s: %s", socket_path, why);
    if (strcmp(command, "ADD") == 0 || strcmp(command, "STATUS") == 0)
        fail(11, "enforcer unreachable: the pod waits until the node's enforcer answers", details);
    fprintf(stderr, "enforcer-cni %s: enforcer unreachable (%s); nothing to undo here\n", command, details);
    exit(0);
}

/* ------------------------------------------------------------------ the netconf's top-level keys */

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* p at '"': returns the character after the closing quote, or NULL. */
static const char *skip_string(const char *p) {
    for (p++; *p; p++) {
        if (*p == '\\') {
            if (!*++p) return NULL;
        } else if (*p == '"') {
            return p + 1;
        }
    }
    return NULL;
}

/* Skips one JSON value (strings and nesting aware, not validating); NULL if it runs off the end. */
static const char *skip_value(const char *p) {
    if (*p == '"') return skip_string(p);
    int depth = 0;
    while (*p) {
        if (*p == '"') {
            if (!(p = skip_string(p))) return NULL;
            continue;
        }
        if (*p == '{' || *p == '[') {
            depth++;
        } else if (*p == '}' || *p == ']') {
            if (depth == 0) return p;
            if (--depth == 0) return p + 1;
        } else if (depth == 0 && (*p == ',' || *p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
            return p;
        }
        p++;
    }
    return depth == 0 ? p : NULL;
}

/* The value of the top-level key `key` (written without escapes) of the object in `s`, or NULL. */
static const char *top_value(const char *s, const char *key) {
    size_t klen = strlen(key);
    const char *p = skip_ws(s);
    if (*p++ != '{') return NULL;
    for (;;) {
        p = skip_ws(p);
        if (*p != '"') return NULL;
        const char *k = p + 1, *end = skip_string(p);
        if (!end) return NULL;
        int match = (size_t)(end - 1 - k) == klen && memcmp(k, key, klen) == 0;
        p = skip_ws(end);
        if (*p++ != ':') return NULL;
        p = skip_ws(p);
        if (match) return p;
        if (!(p = skip_value(p))) return NULL;
        p = skip_ws(p);
        if (*p++ != ',') return NULL;
    }
}

/* Copies a string value made only of `allowed` characters (so no escapes) into out; -1 if not. */
static int plain_string(const char *v, const char *allowed, char *out, size_t outsz) {
    if (!v || *v != '"') return -1;
    size_t n = 0;
    for (v++; *v != '"'; v++, n++) {
        if (!*v || n + 1 >= outsz || !strchr(allowed, *v)) return -1;
        out[n] = *v;
    }
    if (n == 0) return -1;
    out[n] = '\0';
    return 0;
}

static void read_netconf(void) {
    size_t len = 0;
    for (;;) {
        ssize_t n = read(0, netconf + len, NETCONF_MAX - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail(5, "cannot read the network configuration from stdin", strerror(errno));
        if (n == 0) break;
        len += (size_t)n;
        if (len == NETCONF_MAX) {
            char extra;
            if (read(0, &extra, 1) > 0) fail(7, "network configuration too large", "more than 262144 bytes");
            break;
        }
    }
    netconf[len] = '\0';
    if (strlen(netconf) != len) fail(6, "network configuration holds a NUL byte", "stdin");
}

/* ------------------------------------------------------------------ the exchange */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` on fd until the deadline: 0 ready, -1 timed out or failed. */
static int wait_fd(int fd, short events, int64_t deadline) {
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return -1;
        struct pollfd pfd = {.fd = fd, .events = events};
        int r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0) return 0;
        if (r < 0 && errno != EINTR) return -1;
    }
}

static size_t build_request(void) {
    unsigned char *body = request + 4, *p = body;
    *p++ = PROTOCOL_VERSION;
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++) {
        const char *value = getenv(FORWARDED[i]);
        if (!value) continue;
        size_t nlen = strlen(FORWARDED[i]), vlen = strlen(value);
        if ((size_t)(p - body) + nlen + 1 + vlen + 1 > 1 + ENV_MAX) fail(4, "CNI environment too large", FORWARDED[i]);
        memcpy(p, FORWARDED[i], nlen), p += nlen;
        *p++ = '=';
        memcpy(p, value, vlen), p += vlen;
        *p++ = '\0';
    }
    *p++ = '\0';
    size_t clen = strlen(netconf);
    memcpy(p, netconf, clen), p += clen;
    size_t n = (size_t)(p - body);
    request[0] = (unsigned char)(n >> 24), request[1] = (unsigned char)(n >> 16);
    request[2] = (unsigned char)(n >> 8), request[3] = (unsigned char)n;
    return 4 + n;
}

static int send_all(int fd, const unsigned char *buf, size_t len, int64_t deadline) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(fd, POLLOUT, deadline) < 0) return -1;
            continue;
        }
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads exactly len bytes; -1 on end of stream, error or deadline. */
static int recv_all(int fd, unsigned char *buf, size_t len, int64_t deadline) {
    while (len > 0) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (wait_fd(fd, POLLIN, deadline) < 0) return -1;
            continue;
        }
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const char *cmd = getenv("CNI_COMMAND");
    if (!cmd || !*cmd) fail(4, "CNI_COMMAND is not set", "enforcer-cni is a CNI plugin, run by the container runtime");
    command = cmd;
    if (strcmp(command, "VERSION") == 0) {
        printf("{\"cniVersion\":\"1.0.0\",\"supportedVersions\":" SUPPORTED "}\n");
        return 0;
    }
    strcpy(socket_path, DEFAULT_SOCKET);
    read_netconf();
    const char *v = top_value(netconf, "cniVersion");
    char version[sizeof cni_version];
    if (v && plain_string(v, "0123456789.", version, sizeof version) == 0) strcpy(cni_version, version);
    if ((v = top_value(netconf, "socket")) != NULL &&
        (plain_string(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-", socket_path,
                      sizeof socket_path) != 0 || socket_path[0] != '/'))
        fail(7, "netconf \"socket\" must be an absolute path of [A-Za-z0-9/._-], shorter than 108 bytes", "socket");
    int timeout_s = DEFAULT_TIMEOUT_S;
    if ((v = top_value(netconf, "timeout")) != NULL) {
        char *end;
        long t = strtol(v, &end, 10);
        if (end == v || t < 1 || t > MAX_TIMEOUT_S || (*skip_ws(end) != ',' && *skip_ws(end) != '}'))
            fail(7, "netconf \"timeout\" must be whole seconds from 1 to 600", "timeout");
        timeout_s = (int)t;
    }
    size_t len = build_request();
    int64_t deadline = now_ms() + (int64_t)timeout_s * 1000;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) unreachable(strerror(errno));
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, socket_path, strlen(socket_path));
    /* A unix stream connect never completes later: EAGAIN means a full backlog, so try again. */
    while (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (errno != EAGAIN && errno != EINTR) unreachable(strerror(errno));
        if (now_ms() >= deadline) unreachable("timed out connecting (backlog full)");
        poll(NULL, 0, 20);
    }
    if (send_all(fd, request, len, deadline) < 0) unreachable("could not send the request");
    unsigned char head[4];
    if (recv_all(fd, head, 4, deadline) < 0) unreachable("no answer before the deadline");
    size_t n = (size_t)head[0] << 24 | (size_t)head[1] << 16 | (size_t)head[2] << 8 | head[3];
    if (n < 1 || n > REPLY_MAX) unreachable("malformed answer (length)");
    if (recv_all(fd, reply, n, deadline) < 0) unreachable("answer cut short");
    close(fd);
    if (reply[0] > 1) unreachable("malformed answer (exit code)");
    if (write_all(1, reply + 1, n - 1) < 0) return 1;
    return reply[0];
}

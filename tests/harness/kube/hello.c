/* A tiny static HTTP server for cluster tests: `hello PORT TEXT` answers every request with
 * "200 OK" and TEXT followed by the node's hostname; exits on SIGTERM. */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: hello PORT TEXT\n"); return 2; }
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    signal(SIGPIPE, SIG_IGN);
    char host[256] = "?";
    gethostname(host, sizeof host - 1);
    char body[1024];
    int blen = snprintf(body, sizeof body, "%s %s\n", argv[2], host);
    char resp[1400];
    int rlen = snprintf(resp, sizeof resp,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n%s", blen, body);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 64) != 0) { perror("hello: bind/listen"); return 1; }
    fprintf(stderr, "hello: listening on :%s\n", argv[1]);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char buf[4096];
        ssize_t n = read(c, buf, sizeof buf); /* the request head (one read is enough for a test client) */
        if (n > 0) {
            ssize_t off = 0;
            while (off < rlen) { ssize_t w = write(c, resp + off, (size_t)(rlen - off)); if (w <= 0) break; off += w; }
        }
        close(c);
    }
}

/*
 * floor.c: the least a prober can do, as a CPU floor for bench/run (not
 * something to deploy).
 *
 *   floor HOST PORT PATH INTERVAL_MS TIMEOUT_MS
 *
 * Every INTERVAL_MS (probe starts on a fixed schedule): open a fresh TCP
 * connection to HOST:PORT (an IPv4 address), send the GET the sidekick sends,
 * read the response head up to its blank line (as the sidekick does without
 * --expect-body), look at the status, close. Each socket operation is bounded
 * by TIMEOUT_MS. No etcd, no logging, no allocation; SIGTERM ends it. Built by
 * bench/run with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int probe(const struct sockaddr_in *addr, const char *req, size_t req_len, const struct timeval *tv) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, sizeof *tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, tv, sizeof *tv);
    int ok = 0;
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) == 0 &&
        send(fd, req, req_len, MSG_NOSIGNAL) == (ssize_t)req_len) {
        char buf[4096];
        size_t have = 0;
        for (;;) {
            ssize_t n = recv(fd, buf + have, sizeof buf - 1 - have, 0);
            if (n <= 0)
                break;
            have += (size_t)n;
            buf[have] = 0;
            if (strstr(buf, "\r\n\r\n") || have == sizeof buf - 1)
                break;
        }
        /* "HTTP/1.x 2xx" or "3xx": healthy by the sidekick's default. */
        ok = have >= 12 && memcmp(buf, "HTTP/1.", 7) == 0 && (buf[9] == '2' || buf[9] == '3');
    }
    close(fd);
    return ok;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: floor HOST PORT PATH INTERVAL_MS TIMEOUT_MS\n");
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "floor: %s is not an IPv4 address\n", argv[1]);
        return 2;
    }
    long interval_ms = atol(argv[4]), timeout_ms = atol(argv[5]);
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    char req[512];
    int req_len = snprintf(req, sizeof req,
                           "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: etcd-sidekick/0.1.0\r\nAccept: */*\r\n"
                           "Connection: close\r\n\r\n",
                           argv[3], argv[1], argv[2]);
    if (req_len <= 0 || req_len >= (int)sizeof req)
        return 2;

    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        probe(&addr, req, (size_t)req_len, &tv);
        next.tv_nsec += interval_ms * 1000000L;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}

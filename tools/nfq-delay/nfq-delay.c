/*
 * nfq-delay: hold every packet of one NFQUEUE for a fixed delay, then accept it.
 *
 * The kernel here has no netem, so the WAN test bed adds one-way delay with this program on
 * an iptables NFQUEUE rule (ingress of each namespace). The delay is the same for every packet,
 * so packets leave in arrival order and one batch verdict ("accept every id up to N") releases
 * all packets whose time has come; a lost netlink message therefore never strands a packet.
 *
 * usage: nfq-delay QUEUE_NUM DELAY_US     prints "ready" once bound; SIGTERM/SIGINT exit cleanly.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#define RING 262144u /* power of two, above any queue length the profiles reach */

struct held { uint32_t id; uint64_t due_ns; };

static struct held ring[RING];
static uint32_t head, tail;
static uint64_t delay_ns;
static volatile sig_atomic_t stop;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
	struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
	(void)msg; (void)data;
	if (!ph)
		return 0;
	uint32_t id = ntohl(ph->packet_id);
	if (tail - head >= RING) /* ring full: accept at once rather than lose track */
		return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
	ring[tail & (RING - 1)] = (struct held){ id, now_ns() + delay_ns };
	tail++;
	return 0;
}

/* Accept every held packet that is due; returns ns until the next one is (-1: none held). */
static int64_t release_due(struct nfq_q_handle *qh)
{
	uint64_t now = now_ns();
	uint32_t last = 0;
	int any = 0;
	while (head != tail && ring[head & (RING - 1)].due_ns <= now) {
		last = ring[head & (RING - 1)].id;
		any = 1;
		head++;
	}
	if (any)
		nfq_set_verdict_batch(qh, last, NF_ACCEPT);
	if (head == tail)
		return -1;
	return (int64_t)(ring[head & (RING - 1)].due_ns - now);
}

static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s QUEUE_NUM DELAY_US\n", argv[0]);
		return 2;
	}
	int qnum = atoi(argv[1]);
	delay_ns = strtoull(argv[2], NULL, 10) * 1000ull;
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);

	struct nfq_handle *h = nfq_open();
	if (!h) { perror("nfq_open"); return 1; }
	struct nfq_q_handle *qh = nfq_create_queue(h, (uint16_t)qnum, on_packet, NULL);
	if (!qh) { perror("nfq_create_queue"); nfq_close(h); return 1; }
	if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0) { perror("nfq_set_mode"); return 1; }
	nfq_set_queue_maxlen(qh, RING / 2);
	nfnl_rcvbufsiz(nfq_nfnlh(h), 64u << 20);
	int fd = nfq_fd(h);
	int one = 1;
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one));

	printf("ready\n");
	fflush(stdout);

	static char buf[1 << 16] __attribute__((aligned));
	while (!stop) {
		int64_t wait = release_due(qh);
		struct timespec ts = { wait / 1000000000, wait % 1000000000 };
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int n = ppoll(&p, 1, wait < 0 ? NULL : &ts, NULL);
		if (n < 0 && errno != EINTR) { perror("poll"); break; }
		if (n <= 0)
			continue;
		for (;;) { /* drain everything queued before releasing again */
			ssize_t len = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
			if (len < 0) {
				if (errno == EINTR || errno == ENOBUFS)
					continue;
				break;
			}
			nfq_handle_packet(h, buf, (int)len);
		}
	}
	/* Let everything still held go on its way before the queue disappears. */
	if (head != tail)
		nfq_set_verdict_batch(qh, ring[(tail - 1) & (RING - 1)].id, NF_ACCEPT);
	nfq_destroy_queue(qh);
	nfq_close(h);
	return 0;
}

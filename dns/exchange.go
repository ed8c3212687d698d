package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"iapd/internal/logkey"

	dnsmsg "github.com/miekg/dns"
)

const (
	// ednsSize is the UDP payload size offered in EDNS0, the value of DNS
	// Flag Day 2020 that avoids IP fragmentation on common paths.
	ednsSize = 1232

	// maxMessageSize is the largest DNS message; UDP reads use a buffer
	// this big so that a server ignoring ednsSize is still read whole.
	maxMessageSize = 65535
)

// udpBuffers holds read buffers of maxMessageSize bytes.
var udpBuffers = sync.Pool{New: func() any { return new([maxMessageSize]byte) }}

// attemptResult is the outcome of asking one server once.
type attemptResult struct {
	index int // position of the server in the exchange's server list
	round int
	resp  *dnsmsg.Msg // set when err is nil: NOERROR or NXDOMAIN
	err   error
}

// exchange queries the servers for (name, qtype) with Windows-style timing
// and returns the first usable answer. Round 0 asks the first server and
// waits Timeouts[0]; each later round asks every server again and waits
// its own timeout. Sockets of earlier rounds keep listening, so a late
// answer still wins. A round whose servers have all failed ends at once.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dnsmsg.Msg, error) {
	// Cancelling ends the attempts still waiting and closes their sockets.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// One exchange keeps to the servers it started with, even when
	// SetServers replaces them meanwhile.
	servers := r.current().servers
	if len(servers) == 0 {
		return nil, fmt.Errorf("%w: no servers configured", ErrNoAnswer)
	}

	// Buffered for every attempt that can be started, so attempts that
	// finish after exchange returned never block.
	results := make(chan attemptResult, 1+(len(r.timeouts)-1)*len(servers))
	failures := make([]error, len(servers)) // first failure of each server

	for round, wait := range r.timeouts {
		count := len(servers)
		if round == 0 {
			count = 1
		}
		for i := range count {
			go func() { results <- r.attempt(ctx, servers[i], i, round, name, qtype) }()
		}

		resp, err := waitRound(ctx, results, round, count, wait, failures)
		if resp != nil || err != nil {
			return resp, err
		}
	}
	return nil, r.noAnswer(ctx, name, servers, failures)
}

// waitRound waits up to wait for a usable answer from any attempt so far.
// It returns nil, nil when the round ends without one: the wait is over,
// or all pending attempts of this round have failed.
func waitRound(ctx context.Context, results <-chan attemptResult, round, pending int, wait time.Duration, failures []error) (*dnsmsg.Msg, error) {
	timer := time.NewTimer(wait)
	defer timer.Stop()

	for pending > 0 {
		select {
		case res := <-results:
			if res.err == nil {
				return res.resp, nil
			}
			if failures[res.index] == nil {
				failures[res.index] = res.err
			}
			if res.round == round {
				pending--
			}
		case <-timer.C:
			return nil, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return nil, nil
}

// noAnswer builds the error of an exchange that got no usable answer. The
// first server's failure (in server order) is the primary cause, and the
// others go to the debug log.
func (r *Resolver) noAnswer(ctx context.Context, name string, servers []netip.AddrPort, failures []error) error {
	var primary error
	for i, err := range failures {
		if err == nil {
			continue
		}
		if primary == nil {
			primary = err
			continue
		}
		if r.log.Enabled(ctx, slog.LevelDebug) {
			r.log.LogAttrs(ctx, slog.LevelDebug, "server failed",
				slog.String(logkey.Target, name), slog.String("server", servers[i].String()), slog.Any(logkey.Err, err))
		}
	}
	if primary == nil {
		return ErrNoAnswer
	}
	return fmt.Errorf("%w: %w", ErrNoAnswer, primary)
}

// attempt queries the server at index once and classifies its answer:
// SERVFAIL, REFUSED and every rcode other than NOERROR and NXDOMAIN count
// as a failure of that server.
func (r *Resolver) attempt(ctx context.Context, server netip.AddrPort, index, round int, name string, qtype uint16) attemptResult {
	start := time.Now()
	resp, network, err := r.ask(ctx, server, name, qtype)
	rtt := time.Since(start)

	if err == nil && resp.Rcode != dnsmsg.RcodeSuccess && resp.Rcode != dnsmsg.RcodeNameError {
		err = fmt.Errorf("server returned %s", dnsmsg.RcodeToString[resp.Rcode])
	}

	// Attempts cut short because the exchange ended are not worth a record.
	if ctx.Err() == nil && r.log.Enabled(ctx, slog.LevelDebug) {
		attrs := []slog.Attr{
			slog.String(logkey.Target, name),
			slog.String("server", server.String()),
			slog.String("network", network),
			slog.String("type", dnsmsg.TypeToString[qtype]),
			slog.Int("round", round),
			slog.Duration("rtt", rtt),
		}
		if resp != nil {
			attrs = append(attrs, slog.String("rcode", dnsmsg.RcodeToString[resp.Rcode]))
		}
		if err != nil {
			attrs = append(attrs, slog.Any(logkey.Err, err))
		}
		r.log.LogAttrs(ctx, slog.LevelDebug, "dns query", attrs...)
	}

	if err != nil {
		return attemptResult{index: index, round: round, err: fmt.Errorf("querying %s: %w", server, err)}
	}
	return attemptResult{index: index, round: round, resp: resp}
}

// ask sends the question over UDP and, when the answer is truncated, again
// over TCP to the same server. It returns the network of the answer.
func (r *Resolver) ask(ctx context.Context, server netip.AddrPort, name string, qtype uint16) (*dnsmsg.Msg, string, error) {
	query := new(dnsmsg.Msg).SetQuestion(name, qtype)
	query.SetEdns0(ednsSize, false)

	resp, err := r.askOver(ctx, "udp", server, query)
	if err != nil || !resp.Truncated {
		return resp, "udp", err
	}

	query.Id = dnsmsg.Id()
	resp, err = r.askOver(ctx, "tcp", server, query)
	return resp, "tcp", err
}

// askOver sends query on a new socket from the resolver's Dial, the only
// place where sockets are made, so that every query leaves through the
// access point's interface.
func (r *Resolver) askOver(ctx context.Context, network string, server netip.AddrPort, query *dnsmsg.Msg) (*dnsmsg.Msg, error) {
	packed, err := query.Pack()
	if err != nil {
		return nil, fmt.Errorf("packing query: %w", err)
	}

	conn, err := r.dial(ctx, network, server.String())
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", network, err)
	}
	defer conn.Close()

	// Unblock reads and writes when the exchange ends. An expired deadline
	// does this without racing the deferred Close.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	r.stats.queriesSent.Add(1)
	if network == "tcp" {
		r.stats.tcpQueries.Add(1)
		return exchangeTCP(conn, query, packed)
	}
	return exchangeUDP(conn, query, packed)
}

// exchangeUDP writes one datagram and reads until a datagram matches the
// query. Datagrams that do not parse or do not match are dropped, as they
// may be forgeries, and the wait goes on until the exchange ends.
func exchangeUDP(conn net.Conn, query *dnsmsg.Msg, packed []byte) (*dnsmsg.Msg, error) {
	if _, err := conn.Write(packed); err != nil {
		return nil, fmt.Errorf("sending query: %w", err)
	}

	buf := udpBuffers.Get().(*[maxMessageSize]byte)
	defer udpBuffers.Put(buf)
	for {
		n, err := conn.Read(buf[:])
		if err != nil {
			return nil, fmt.Errorf("reading answer: %w", err)
		}
		resp := new(dnsmsg.Msg)
		if err := resp.Unpack(buf[:n]); err != nil {
			// A truncated answer may end inside a record; its header is
			// enough to switch to TCP.
			if resp.Truncated && resp.Response && resp.Id == query.Id {
				return resp, nil
			}
			continue
		}
		if matchesQuery(query, resp) {
			return resp, nil
		}
	}
}

// exchangeTCP writes the query with its two-byte length prefix (RFC 1035
// section 4.2.2) and reads one answer, which must match.
func exchangeTCP(conn net.Conn, query *dnsmsg.Msg, packed []byte) (*dnsmsg.Msg, error) {
	framed := make([]byte, 2+len(packed))
	binary.BigEndian.PutUint16(framed, uint16(len(packed)))
	copy(framed[2:], packed)
	if _, err := conn.Write(framed); err != nil {
		return nil, fmt.Errorf("sending query: %w", err)
	}

	var length [2]byte
	if _, err := io.ReadFull(conn, length[:]); err != nil {
		return nil, fmt.Errorf("reading answer length: %w", err)
	}
	buf := make([]byte, binary.BigEndian.Uint16(length[:]))
	if _, err := io.ReadFull(conn, buf); err != nil {
		return nil, fmt.Errorf("reading answer: %w", err)
	}

	resp := new(dnsmsg.Msg)
	if err := resp.Unpack(buf); err != nil {
		return nil, fmt.Errorf("parsing answer: %w", err)
	}
	if !matchesQuery(query, resp) {
		return nil, errors.New("answer does not match the query")
	}
	return resp, nil
}

// matchesQuery reports whether resp answers query: same ID and same
// question. An error answer may omit the question, as some servers do for
// REFUSED.
func matchesQuery(query, resp *dnsmsg.Msg) bool {
	if !resp.Response || resp.Id != query.Id {
		return false
	}
	if len(resp.Question) == 0 {
		return resp.Rcode != dnsmsg.RcodeSuccess && resp.Rcode != dnsmsg.RcodeNameError
	}
	q, a := query.Question[0], resp.Question[0]
	return len(resp.Question) == 1 && a.Qtype == q.Qtype && a.Qclass == q.Qclass && strings.EqualFold(a.Name, q.Name)
}

package testbed

import (
	"bytes"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// webServer responds to every HTTP request with the uplink's name and the
// client address it saw, which is how a test proves which interface and
// source address a connection left through. Two paths do more:
// /bytes?n=N adds N bytes of 'x' after that line, and /hold sends the line,
// then waits until the test releases the uplink's hold (see Uplink.Hold)
// before it sends "done\n". While silent (see Uplink.StopAnswering), it
// accepts connections but never responds.
type webServer struct {
	accepted atomic.Int64
	silent   atomic.Bool
	srv      *http.Server
	sink     *logSink
	uplink   string
	wg       sync.WaitGroup
	done     chan struct{} // closed when the test ends

	mu      sync.Mutex    // protects release, holding, resume and accepts
	release chan struct{} // closed to let /hold requests finish
	holding int           // /hold requests waiting
	resume  chan struct{} // closed and replaced when the server answers again
	accepts []time.Time   // when each connection was accepted
}

func startWeb(t testing.TB, u *Uplink) *webServer {
	t.Helper()
	w := &webServer{uplink: u.Name, release: make(chan struct{}), resume: make(chan struct{}), done: make(chan struct{})}
	sink := newLogSink(t)
	w.sink = sink
	srv := &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if w.silent.Load() {
				w.stall(rw)
				return
			}
			client := r.RemoteAddr
			if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
				client = ap.Addr().Unmap().String()
			}
			fmt.Fprintf(rw, "uplink=%s client=%s\n", u.Name, client)
			switch r.URL.Path {
			case "/bytes":
				n, _ := strconv.Atoi(r.URL.Query().Get("n"))
				rw.Write(bytes.Repeat([]byte("x"), n))
			case "/hold":
				w.hold(rw, r)
			}
		}),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(sink, "web "+u.Name+": ", 0),
	}

	w.srv = srv
	for _, ip := range []netip.Addr{WebIPv4, WebIPv6} {
		w.serve(t, u, ip)
	}
	t.Cleanup(func() {
		close(w.done)
		srv.Close()
		w.wg.Wait()
	})
	return w
}

// stall holds the client's connection without a response, not even the
// empty one that returning from the handler would send, which is what a
// stalled server looks like to a client. It closes the connection when
// the server answers again or the test ends.
func (w *webServer) stall(rw http.ResponseWriter) {
	w.mu.Lock()
	resume := w.resume
	w.mu.Unlock()
	c, _, err := http.NewResponseController(rw).Hijack()
	if err != nil {
		return
	}
	select {
	case <-resume:
	case <-w.done:
	}
	c.Close()
}

// setSilent makes the server stop responding, or respond again.
func (w *webServer) setSilent(silent bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.silent.Swap(silent) && !silent {
		close(w.resume)
		w.resume = make(chan struct{})
	}
}

// firstAcceptAfter returns when the first connection accepted after t0
// was accepted.
func (w *webServer) firstAcceptAfter(t0 time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, at := range w.accepts {
		if at.After(t0) {
			return at, true
		}
	}
	return time.Time{}, false
}

// hold sends what was written so far, then waits for the release or for
// the client to go.
func (w *webServer) hold(rw http.ResponseWriter, r *http.Request) {
	rw.(http.Flusher).Flush()
	w.mu.Lock()
	release := w.release
	w.holding++
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.holding--
		w.mu.Unlock()
	}()

	select {
	case <-release:
		fmt.Fprint(rw, "done\n")
	case <-r.Context().Done():
	}
}

// Hold makes requests for /hold on u wait until the returned function is
// called; the function may be called more than once. Holding reports how
// many such requests wait now.
func (u *Uplink) Hold() (release func()) {
	w := u.web
	w.mu.Lock()
	ch := make(chan struct{})
	w.release = ch
	w.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }
}

// Holding returns how many /hold requests wait on u now.
func (u *Uplink) Holding() int {
	u.web.mu.Lock()
	defer u.web.mu.Unlock()
	return u.web.holding
}

// serve adds a listener on ip port 80, inside u's namespace.
func (w *webServer) serve(t testing.TB, u *Uplink, ip netip.Addr) {
	t.Helper()
	ln := u.NS.Listen(t, "tcp", netip.AddrPortFrom(ip, 80).String())
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		err := w.srv.Serve(&countingListener{Listener: ln, web: w})
		if !errors.Is(err, http.ErrServerClosed) {
			w.sink.logf("web %s on %s: %v", w.uplink, ln.Addr(), err)
		}
	}()
}

// countingListener counts the connections a web server accepts, and
// records when.
type countingListener struct {
	net.Listener
	web *webServer
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		now := time.Now()
		l.web.accepted.Add(1)
		l.web.mu.Lock()
		l.web.accepts = append(l.web.accepts, now)
		l.web.mu.Unlock()
	}
	return c, err
}

// dnsServer is an authoritative server for the names of the bed:
// www.<uplink>.test (A and AAAA), v6.<uplink>.test (AAAA only), and
// both.test and every name under it (A on every uplink). It answers
// NXDOMAIN for anything else and logs every question. While silent, it
// logs questions but sends no answer.
type dnsServer struct {
	uplink string
	sink   *logSink
	wg     sync.WaitGroup
	silent atomic.Bool

	mu      sync.Mutex // protects log, sites and servers
	log     []string
	sites   map[string]netip.Addr // domain to address, for the domain and every name below it
	servers []*dns.Server
}

const dnsTTL = 60 // seconds

func startDNS(t testing.TB, u *Uplink) *dnsServer {
	t.Helper()
	d := &dnsServer{uplink: u.Name, sink: newLogSink(t), sites: make(map[string]netip.Addr)}
	for _, ip := range []netip.Addr{DNSIPv4, DNSIPv6} {
		d.serve(t, u, netip.AddrPortFrom(ip, 53).String())
	}
	t.Cleanup(func() {
		d.mu.Lock()
		servers := d.servers
		d.mu.Unlock()
		for _, srv := range servers {
			srv.Shutdown()
		}
		d.wg.Wait()
	})
	return d
}

// serve answers on addr over UDP and TCP, inside u's namespace.
func (d *dnsServer) serve(t testing.TB, u *Uplink, addr string) {
	t.Helper()
	servers := []*dns.Server{
		{PacketConn: u.NS.ListenPacket(t, "udp", addr), Handler: d},
		{Listener: u.NS.Listen(t, "tcp", addr), Handler: d},
	}
	for _, srv := range servers {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := srv.ActivateAndServe(); err != nil {
				d.sink.logf("dns %s: %v", u.Name, err)
			}
		}()
		// Shutdown refuses a server that has not started, which would
		// leave its goroutine running.
		<-started
	}
	d.mu.Lock()
	d.servers = append(d.servers, servers...)
	d.mu.Unlock()
}

// ServeDNS answers one query; it implements dns.Handler.
func (d *dnsServer) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	// Go's resolver takes a reply that is neither authoritative nor
	// recursive for a lame referral and ignores it.
	m.Authoritative = true
	m.RecursionAvailable = true

	if len(req.Question) != 1 {
		m.SetRcode(req, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	d.record(name + " " + dns.TypeToString[q.Qtype])
	if d.silent.Load() {
		return
	}

	v4, v6, known := d.records(name)
	switch {
	case !known:
		m.SetRcode(req, dns.RcodeNameError)
	case q.Qtype == dns.TypeA && v4.IsValid():
		m.Answer = append(m.Answer, &dns.A{
			Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: dnsTTL},
			A:   v4.AsSlice(),
		})
	case q.Qtype == dns.TypeAAAA && v6.IsValid():
		m.Answer = append(m.Answer, &dns.AAAA{
			Hdr:  dns.RR_Header{Name: q.Name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: dnsTTL},
			AAAA: v6.AsSlice(),
		})
	}
	if len(m.Answer) == 0 {
		// A negative answer carries the zone's SOA, so resolvers know how
		// long they may cache it.
		m.Ns = append(m.Ns, &dns.SOA{
			Hdr:     dns.RR_Header{Name: "test.", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: dnsTTL},
			Ns:      "ns.test.",
			Mbox:    "hostmaster.test.",
			Serial:  1,
			Refresh: 3600,
			Retry:   600,
			Expire:  86400,
			Minttl:  dnsTTL,
		})
	}
	w.WriteMsg(m)
}

// records returns the addresses of name on d's uplink; known is false when
// the name does not exist there.
func (d *dnsServer) records(name string) (v4, v6 netip.Addr, known bool) {
	d.mu.Lock()
	for domain, addr := range d.sites {
		if name == domain+"." || strings.HasSuffix(name, "."+domain+".") {
			d.mu.Unlock()
			return addr, netip.Addr{}, true
		}
	}
	d.mu.Unlock()
	switch name {
	case "www." + d.uplink + ".test.":
		return WebIPv4, WebIPv6, true
	case "v6." + d.uplink + ".test.":
		return netip.Addr{}, WebIPv6, true
	case "both.test.":
		return WebIPv4, netip.Addr{}, true
	}
	if strings.HasSuffix(name, ".both.test.") {
		return WebIPv4, netip.Addr{}, true
	}
	return netip.Addr{}, netip.Addr{}, false
}

func (d *dnsServer) record(question string) {
	d.mu.Lock()
	d.log = append(d.log, question)
	d.mu.Unlock()
}

func (d *dnsServer) queries() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.log...)
}

func (d *dnsServer) reset() {
	d.mu.Lock()
	d.log = nil
	d.mu.Unlock()
}

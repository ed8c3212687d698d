package proxy

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// thisNetwork is 0.0.0.0/8, "this host on this network" (RFC 1122 section
// 3.2.1.3); Linux connects to 0.0.0.0 as to the host itself.
var thisNetwork = netip.MustParsePrefix("0.0.0.0/8")

// isLocalTarget reports whether a connection to addr would stay on this
// host or its links: loopback, link-local, unspecified and 0.0.0.0/8
// addresses, and the host's own addresses. Such targets are refused unless
// the app allows local targets, so that a proxy client cannot reach
// services that listen only locally, nor by a name that resolves there.
func (s *Server) isLocalTarget(addr netip.Addr) bool {
	addr = addr.Unmap()
	switch {
	case addr.IsLoopback(), addr.IsLinkLocalUnicast(), addr.IsUnspecified(), thisNetwork.Contains(addr):
		return true
	case addr.IsInterfaceLocalMulticast(), addr.IsLinkLocalMulticast():
		return true
	}
	return s.cfg.IsHostAddr(addr.WithZone(""))
}

// hostAddrRefresh is how long the host's addresses are cached when
// Config.IsHostAddr is not set.
const hostAddrRefresh = 2 * time.Second

// hostAddrs caches the host's addresses from net.InterfaceAddrs. It is the
// default of Config.IsHostAddr and safe for concurrent use.
type hostAddrs struct {
	mu      sync.Mutex
	addrs   map[netip.Addr]bool // guarded by mu
	expires time.Time           // guarded by mu
}

// has reports whether addr is an address of one of the host's interfaces.
func (h *hostAddrs) has(addr netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if now := time.Now(); now.After(h.expires) {
		h.addrs = make(map[netip.Addr]bool)
		// On failure the set stays empty until the next refresh; the
		// loopback and link-local checks still hold.
		if list, err := net.InterfaceAddrs(); err == nil {
			for _, a := range list {
				if p, err := netip.ParsePrefix(a.String()); err == nil {
					h.addrs[p.Addr().Unmap().WithZone("")] = true
				}
			}
		}
		h.expires = now.Add(hostAddrRefresh)
	}
	return h.addrs[addr]
}

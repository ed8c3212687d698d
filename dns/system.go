package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"time"
)

// System returns a resolver that passes lookups to the host's resolver
// (net.DefaultResolver), for an access point with "dns: system". That
// resolver follows /etc/resolv.conf and nsswitch.conf, so its queries leave
// wherever the main routing table sends them. System keeps no cache.
func System() *Resolver {
	return &Resolver{
		name:   "system",
		system: net.DefaultResolver,
		log:    slog.New(slog.DiscardHandler),
		now:    time.Now,
	}
}

// lookupSystem calls the host's resolver and orders the result like
// LookupNetIP does: IPv4 first, then IPv6.
func (r *Resolver) lookupSystem(ctx context.Context, host string) ([]netip.Addr, error) {
	r.stats.queriesSent.Add(1)
	addrs, err := r.system.LookupNetIP(ctx, "ip", host)
	if err != nil {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			return nil, fmt.Errorf("%w: %w", ErrNotFound, err)
		}
		return nil, err
	}

	// The host's resolver may return IPv4 addresses in their IPv6-mapped
	// form; callers compare and dial them as IPv4.
	for i, a := range addrs {
		addrs[i] = a.Unmap()
	}
	slices.SortStableFunc(addrs, func(a, b netip.Addr) int {
		switch {
		case a.Is4() == b.Is4():
			return 0
		case a.Is4():
			return -1
		}
		return 1
	})
	return addrs, nil
}

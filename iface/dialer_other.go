//go:build !linux

package iface

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

func (d *Dialer) dialBound(ctx context.Context, network, address string, ifc *Interface, src netip.Addr) (net.Conn, error) {
	return nil, fmt.Errorf("binding to interface %s: %w", ifc.Name, ErrUnsupported)
}

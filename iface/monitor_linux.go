package iface

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"iapd/internal/logkey"
)

// rtnlGroups are the rtnetlink(7) multicast groups whose messages can change
// a snapshot. Route groups also carry changes to iapd's own tables, which
// makes the manager repair routes that someone else deleted.
var rtnlGroups = []uint{
	unix.RTNLGRP_LINK,
	unix.RTNLGRP_IPV4_IFADDR,
	unix.RTNLGRP_IPV6_IFADDR,
	unix.RTNLGRP_IPV4_ROUTE,
	unix.RTNLGRP_IPV6_ROUTE,
}

// subscriptionBuffer is the receive buffer asked for the subscription
// socket. When it overflows anyway the kernel reports ENOBUFS and the
// monitor re-reads everything.
const subscriptionBuffer = 1 << 20

// dumpAttempts bounds the re-runs of a dump the kernel marked interrupted
// (NLM_F_DUMP_INTR), which happens when the state changes during the dump.
const dumpAttempts = 3

// NewMonitor subscribes to the kernel's link, address and route
// notifications in the calling thread's network namespace and reads the
// initial state. It does not poll.
func NewMonitor(logger *slog.Logger) (*Monitor, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	src, err := newNetlinkSource(logger.With(logkey.Component, "iface.monitor"))
	if err != nil {
		return nil, err
	}
	return newMonitor(logger, src)
}

// netlinkSource reads state with netlink dumps and waits for changes on one
// socket subscribed to rtnlGroups.
type netlinkSource struct {
	logger *slog.Logger
	sub    *nl.NetlinkSocket
	closed atomic.Bool // set before sub is closed, so receive can tell why it failed

	mu     sync.Mutex // protects handle
	handle *netlink.Handle
}

func newNetlinkSource(logger *slog.Logger) (*netlinkSource, error) {
	// Subscribe before the first dump, so that a change made between the
	// two is seen.
	sub, err := nl.SubscribeAt(netns.None(), netns.None(), unix.NETLINK_ROUTE, rtnlGroups...)
	if err != nil {
		return nil, fmt.Errorf("subscribing to rtnetlink groups: %w", err)
	}
	if err := sub.SetReceiveBufferSize(subscriptionBuffer, false); err != nil {
		logger.Debug("enlarging netlink receive buffer failed", logkey.Err, err)
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		sub.Close()
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	return &netlinkSource{logger: logger, sub: sub, handle: h}, nil
}

func (s *netlinkSource) read() (*Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handle == nil {
		return nil, errSourceClosed
	}

	links, err := dump(func() ([]netlink.Link, error) { return s.handle.LinkList() })
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	addrs, err := dump(func() ([]netlink.Addr, error) { return s.handle.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	main := &netlink.Route{Table: unix.RT_TABLE_MAIN}
	routes, err := dump(func() ([]netlink.Route, error) {
		return s.handle.RouteListFiltered(netlink.FAMILY_ALL, main, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("listing main table routes: %w", err)
	}
	return buildSnapshot(links, addrs, routes), nil
}

// dump runs list again while the kernel reports the dump interrupted, and
// accepts the last result after dumpAttempts: it is at worst briefly stale,
// and the change that interrupted it triggers another read.
func dump[T any](list func() ([]T, error)) ([]T, error) {
	var (
		v   []T
		err error
	)
	for range dumpAttempts {
		v, err = list()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, nil
}

func (s *netlinkSource) receive() error {
	for {
		msgs, from, err := s.sub.Receive()
		switch {
		case err != nil && s.closed.Load():
			return errSourceClosed
		case errors.Is(err, unix.ENOBUFS):
			return fmt.Errorf("netlink receive buffer overrun, messages lost: %w", os.NewSyscallError("recvfrom", err))
		case err != nil:
			return fmt.Errorf("receiving from netlink: %w", err)
		}
		if from.Pid != nl.PidKernel {
			s.logger.Debug("ignoring netlink message not sent by the kernel", "pid", from.Pid)
			continue
		}

		relevant := false
		for _, msg := range msgs {
			name, ok := messageTypes[msg.Header.Type]
			if !ok {
				s.logger.Debug("ignoring netlink message", "type", msg.Header.Type)
				continue
			}
			relevant = true
			s.logger.Debug("netlink message", "type", name, "len", msg.Header.Len)
		}
		if relevant {
			return nil
		}
	}
}

// messageTypes names the rtnetlink(7) messages that change a snapshot.
var messageTypes = map[uint16]string{
	unix.RTM_NEWLINK:  "RTM_NEWLINK",
	unix.RTM_DELLINK:  "RTM_DELLINK",
	unix.RTM_NEWADDR:  "RTM_NEWADDR",
	unix.RTM_DELADDR:  "RTM_DELADDR",
	unix.RTM_NEWROUTE: "RTM_NEWROUTE",
	unix.RTM_DELROUTE: "RTM_DELROUTE",
}

func (s *netlinkSource) close() error {
	s.closed.Store(true)
	s.sub.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handle != nil {
		s.handle.Close()
		s.handle = nil
	}
	return nil
}

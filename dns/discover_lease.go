package dns

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	dnsmsg "github.com/miekg/dns"
)

// leaseDNS returns the servers of the newest unexpired lease for the
// interface called name among the files that globs match. dhclient leases
// are text and name their interface inside; dhcpcd leases are the DHCP
// reply itself and name the interface in the file name.
func leaseDNS(globs []string, name string, now time.Time) (LinkDNS, error) {
	type found struct {
		l    LinkDNS
		when time.Time
	}
	var leases []found
	var errs []error
	for _, g := range globs {
		files, _ := filepath.Glob(g)
		for _, file := range files {
			l, when, err := readLease(file, name, now)
			switch {
			case err == nil:
				leases = append(leases, found{l, when})
			case !errors.Is(err, errNoLinkDNS):
				errs = append(errs, err)
			}
		}
	}
	if len(leases) == 0 {
		errs = append(errs, fmt.Errorf("lease files: %w", errNoLinkDNS))
		return LinkDNS{}, errors.Join(errs...)
	}

	// The newest lease names the DHCP client in charge. Its other leases
	// (dhclient and dhcpcd keep IPv4 and IPv6 apart) add their servers,
	// newest first.
	slices.SortStableFunc(leases, func(a, b found) int {
		return cmp.Or(b.when.Compare(a.when), cmp.Compare(a.l.Detail, b.l.Detail))
	})
	best := leases[0].l
	for _, f := range leases[1:] {
		if f.l.Source != best.Source {
			continue
		}
		best.Servers = append(best.Servers, f.l.Servers...)
		best.Search = append(best.Search, f.l.Search...)
		best.Detail += ", " + f.l.Detail
	}
	return best, nil
}

// readLease reads the DNS servers for the interface name from one lease
// file, with the time the lease was written.
func readLease(file, name string, now time.Time) (LinkDNS, time.Time, error) {
	base := filepath.Base(file)
	if strings.HasPrefix(base, "dhclient") {
		return readDhclientLease(file, name, now)
	}
	// dhcpcd names its files IFACE.lease, IFACE.lease6 or, before
	// version 6, dhcpcd-IFACE.lease.
	iface := strings.TrimSuffix(strings.TrimSuffix(base, ".lease6"), ".lease")
	iface = strings.TrimPrefix(iface, "dhcpcd-")
	if iface != name {
		return LinkDNS{}, time.Time{}, errNoLinkDNS
	}
	return readDhcpcdLease(file, strings.HasSuffix(base, ".lease6"), now)
}

// readDhclientLease parses a dhclient.leases(5) file. dhclient appends a
// lease { } or lease6 { } block on every renewal, so the last unexpired
// block for the interface is the one in force.
func readDhclientLease(file, name string, now time.Time) (LinkDNS, time.Time, error) {
	f, err := os.Open(file)
	if err != nil {
		return LinkDNS{}, time.Time{}, fmt.Errorf("reading dhclient lease: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return LinkDNS{}, time.Time{}, fmt.Errorf("reading dhclient lease: %w", err)
	}

	var found *LinkDNS
	var block *dhclientBlock
	depth := 0 // of braces inside the lease block: lease6 nests ia-na { iaaddr { } }
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case block == nil && (line == "lease {" || line == "lease6 {"):
			block = &dhclientBlock{}
		case block != nil && strings.HasSuffix(line, "{"):
			depth++
		case block != nil && line == "}" && depth > 0:
			depth--
		case block != nil && line == "}":
			if block.iface == name && len(block.servers) > 0 && (block.expire.IsZero() || block.expire.After(now)) {
				found = &LinkDNS{Source: SourceDhclient, Detail: file, Servers: block.servers, Search: block.search}
			}
			block = nil
		case block != nil && depth == 0:
			block.parse(strings.TrimSuffix(line, ";"))
		}
	}
	if err := sc.Err(); err != nil {
		return LinkDNS{}, time.Time{}, fmt.Errorf("reading dhclient lease %s: %w", file, err)
	}
	if found == nil {
		return LinkDNS{}, time.Time{}, errNoLinkDNS
	}
	return *found, info.ModTime(), nil
}

// dhclientBlock is what iapd needs from one lease block.
type dhclientBlock struct {
	iface   string
	servers []netip.AddrPort
	search  []string
	expire  time.Time // zero for "never"
}

func (b *dhclientBlock) parse(line string) {
	key, value, _ := strings.Cut(line, " ")
	switch key {
	case "interface":
		b.iface = strings.Trim(value, `"`)
	case "expire":
		// "expire 4 2024/01/04 10:00:00" in UTC, or "expire never";
		// lease6 blocks keep their times inside the IA, which iapd
		// leaves aside.
		if fields := strings.Fields(value); len(fields) == 3 {
			if t, err := time.Parse("2006/01/02 15:04:05", fields[1]+" "+fields[2]); err == nil {
				b.expire = t
			}
		}
	case "option":
		name, args, _ := strings.Cut(value, " ")
		switch name {
		case "domain-name-servers", "dhcp6.name-servers":
			for _, s := range strings.Split(args, ",") {
				if addr, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil {
					b.servers = append(b.servers, netip.AddrPortFrom(addr.Unmap(), 53))
				}
			}
		case "domain-search", "dhcp6.domain-search":
			for _, s := range strings.Split(args, ",") {
				b.search = append(b.search, strings.Trim(strings.TrimSpace(s), `"`))
			}
		case "domain-name":
			// Debian's dhclient-script takes this as the search list
			// when there is no domain-search; it may hold several names.
			if len(b.search) == 0 {
				b.search = append(b.search, strings.Fields(strings.Trim(args, `"`))...)
			}
		}
	}
}

// DHCP option codes (RFC 2132, RFC 3397, RFC 3646).
const (
	dhcpOptPad          = 0
	dhcpOptDNS          = 6
	dhcpOptDomainName   = 15
	dhcpOptLeaseTime    = 51
	dhcpOptDomainSearch = 119
	dhcpOptEnd          = 255

	dhcp6OptDNS          = 23
	dhcp6OptDomainSearch = 24
)

// dhcpMagic is the cookie that starts the options of a DHCPv4 message
// (RFC 2131 section 3).
var dhcpMagic = []byte{99, 130, 83, 99}

// readDhcpcdLease parses a dhcpcd lease: the DHCPv4 or DHCPv6 reply as
// received (dhcpcd.conf(5) and dhcpcd(8), "-U, --dumplease"). A DHCPv4
// lease counts as expired when its lease time has passed since the file
// was written.
func readDhcpcdLease(file string, v6 bool, now time.Time) (LinkDNS, time.Time, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return LinkDNS{}, time.Time{}, fmt.Errorf("reading dhcpcd lease: %w", err)
	}
	info, err := os.Stat(file)
	if err != nil {
		return LinkDNS{}, time.Time{}, fmt.Errorf("reading dhcpcd lease: %w", err)
	}
	l := LinkDNS{Source: SourceDhcpcd, Detail: file}
	if v6 {
		err = parseDHCPv6(data, &l)
	} else {
		var leaseTime time.Duration
		leaseTime, err = parseDHCPv4(data, &l)
		if err == nil && leaseTime > 0 && info.ModTime().Add(leaseTime).Before(now) {
			return LinkDNS{}, time.Time{}, errNoLinkDNS
		}
	}
	if err != nil {
		return LinkDNS{}, time.Time{}, fmt.Errorf("reading dhcpcd lease %s: %w", file, err)
	}
	if len(l.Servers) == 0 {
		return LinkDNS{}, time.Time{}, errNoLinkDNS
	}
	return l, info.ModTime(), nil
}

// parseDHCPv4 reads the DNS options of a DHCPv4 message (RFC 2131): 236
// bytes of fixed fields, the magic cookie, then code, length, value
// options up to End.
func parseDHCPv4(msg []byte, l *LinkDNS) (time.Duration, error) {
	const fixed = 236
	if len(msg) < fixed+4 || !bytes.Equal(msg[fixed:fixed+4], dhcpMagic) {
		return 0, errors.New("not a DHCPv4 message")
	}
	var leaseTime time.Duration
	opts := msg[fixed+4:]
	for len(opts) > 0 {
		code := opts[0]
		if code == dhcpOptEnd {
			break
		}
		if code == dhcpOptPad {
			opts = opts[1:]
			continue
		}
		if len(opts) < 2 || len(opts) < 2+int(opts[1]) {
			return 0, fmt.Errorf("option %d runs past the end", code)
		}
		value := opts[2 : 2+int(opts[1])]
		opts = opts[2+int(opts[1]):]

		switch code {
		case dhcpOptDNS:
			for i := 0; i+4 <= len(value); i += 4 {
				l.Servers = append(l.Servers, netip.AddrPortFrom(netip.AddrFrom4([4]byte(value[i:i+4])), 53))
			}
		case dhcpOptDomainName:
			l.Search = append(l.Search, strings.Fields(string(value))...)
		case dhcpOptDomainSearch:
			l.Search = append(l.Search, parseDomainList(value)...)
		case dhcpOptLeaseTime:
			if len(value) == 4 {
				if secs := binary.BigEndian.Uint32(value); secs != 0xffffffff {
					leaseTime = time.Duration(secs) * time.Second
				}
			}
		}
	}
	return leaseTime, nil
}

// parseDHCPv6 reads the DNS options of a DHCPv6 message (RFC 8415): type
// and transaction ID in 4 bytes, then options of 2-byte code and length.
func parseDHCPv6(msg []byte, l *LinkDNS) error {
	if len(msg) < 4 {
		return errors.New("not a DHCPv6 message")
	}
	opts := msg[4:]
	for len(opts) >= 4 {
		code := binary.BigEndian.Uint16(opts)
		n := int(binary.BigEndian.Uint16(opts[2:]))
		if len(opts) < 4+n {
			return fmt.Errorf("option %d runs past the end", code)
		}
		value := opts[4 : 4+n]
		opts = opts[4+n:]
		switch code {
		case dhcp6OptDNS:
			for i := 0; i+16 <= len(value); i += 16 {
				l.Servers = append(l.Servers, netip.AddrPortFrom(netip.AddrFrom16([16]byte(value[i:i+16])), 53))
			}
		case dhcp6OptDomainSearch:
			l.Search = append(l.Search, parseDomainList(value)...)
		}
	}
	return nil
}

// parseDomainList reads names in DNS wire format, compression pointers
// included (RFC 3397 allows them within the option).
func parseDomainList(b []byte) []string {
	var names []string
	for off := 0; off < len(b); {
		name, next, err := dnsmsg.UnpackDomainName(b, off)
		if err != nil || next <= off {
			break
		}
		if name != "." {
			names = append(names, strings.TrimSuffix(name, "."))
		}
		off = next
	}
	return names
}

package policy

import (
	"cmp"
	"fmt"
	"slices"
	"time"
)

// This file contains the selection rules: how a destination orders the
// access points that may carry a connection.

// candidate is an access point that may carry a connection, with its state
// and its position in the destination's list.
type candidate struct {
	ap     *AccessPoint
	status Status
	index  int
}

// order returns cands, which are in the destination's order, in the order
// of d's selection rule, and why the first comes first. turn picks the
// first of a round-robin destination.
func order(d *Destination, cands []candidate, c Conditions, turn uint64) ([]candidate, string) {
	if len(cands) == 0 {
		return cands, ""
	}
	switch d.Select {
	case SelectCost:
		return byCost(cands)
	case SelectLatency:
		return byLatency(d, cands, c.Current(d))
	case SelectRoundRobin:
		return roundRobin(cands, turn)
	case SelectRace:
		return cands, fmt.Sprintf("race: dialled first, the next starts after %s", d.RaceDelay)
	}
	return cands, "first usable in the destination's order"
}

// byCost orders by the interfaces' cost, lowest first, keeping the
// destination's order among equal costs.
func byCost(cands []candidate) ([]candidate, string) {
	slices.SortStableFunc(cands, func(a, b candidate) int { return cmp.Compare(a.status.Link.Cost, b.status.Link.Cost) })
	return cands, fmt.Sprintf("lowest cost (%d)", cands[0].status.Link.Cost)
}

// byLatency orders by probe latency, lowest first, with the access points
// that have none after the others in the destination's order. The first
// place then goes to the access point in use when its latency is within
// d.Tolerance of the lowest. Otherwise it goes to the earliest in the
// destination's order that is within the tolerance. So jitter around
// similar latencies does not move new connections back and forth.
func byLatency(d *Destination, cands []candidate, current *AccessPoint) ([]candidate, string) {
	slices.SortStableFunc(cands, func(a, b candidate) int {
		la, lb := a.status.Latency, b.status.Latency
		switch {
		case la == lb:
			return 0
		case la == 0:
			return 1
		case lb == 0:
			return -1
		}
		return cmp.Compare(la, lb)
	})
	best := cands[0].status.Latency
	if best == 0 {
		return cands, "no latency measured yet, so the destination's order"
	}

	first := -1
	for i, cand := range cands {
		lat := cand.status.Latency
		if lat == 0 || lat > best+d.Tolerance {
			break
		}
		if cand.ap == current {
			first = i
			break
		}
		if first < 0 || cand.index < cands[first].index {
			first = i
		}
	}
	chosen := cands[first]
	cands = slices.Delete(cands, first, first+1)
	cands = slices.Insert(cands, 0, chosen)

	lat := chosen.status.Latency.Round(time.Microsecond)
	if first == 0 || chosen.status.Latency == best {
		return cands, fmt.Sprintf("lowest probe latency (%s)", lat)
	}
	return cands, fmt.Sprintf("probe latency %s, within the tolerance of %s of the lowest (%s)", lat, d.Tolerance, best.Round(time.Microsecond))
}

// roundRobin rotates cands so that turn picks the first.
func roundRobin(cands []candidate, turn uint64) ([]candidate, string) {
	start := int(turn % uint64(len(cands)))
	rotated := append(slices.Clone(cands[start:]), cands[:start]...)
	return rotated, fmt.Sprintf("round-robin: its turn among %d usable access points", len(cands))
}

package admin

import (
	"fmt"
	"net"
	"strings"
	"time"

	"iapd/policy"
)

// Explanation is the document of GET /v1/explain: what iapd would do with
// a connection of an app to a target now, without dialling it.
type Explanation struct {
	App          string            `json:"app"`
	Target       string            `json:"target"`
	Destination  string            `json:"destination"`
	Rules        string            `json:"rules,omitempty"`    // the destination's selection rule, hold-down, on_lost and on_better
	Requires     string            `json:"requires,omitempty"` // the app's requirement; empty for none
	AccessPoints []ExplainedAccess `json:"access_points"`      // in the destination's order
	Chosen       string            `json:"chosen,omitempty"`
	Why          string            `json:"why,omitempty"`   // the reason Chosen comes first
	Error        string            `json:"error,omitempty"` // the reason that no access point would be tried
}

// ExplainedAccess is one access point of the destination and whether it
// would be tried.
type ExplainedAccess struct {
	Name      string `json:"name"`
	Interface string `json:"interface"`
	Link      string `json:"link,omitempty"` // the policy's facts about the interface: type, cost, metered
	Usable    bool   `json:"usable"`         // it would be tried
	Reason    string `json:"reason,omitempty"`
	// Filtered is true when the access point is usable but the app's
	// requirement, or the target's address family, rules it out.
	Filtered  bool       `json:"filtered,omitempty"`
	HeldUntil *time.Time `json:"held_until,omitempty"` // end of its hold-down; nil when not held
	Probe     string     `json:"probe,omitempty"`      // the health probe and its state; empty without one
	Order     int        `json:"order,omitempty"`      // 1 for the first to try; 0 when it would not be tried
}

// Explain decides, with policy.NewPlan, which access points a connection
// of the app called appName to target (host:port) would try under
// conditions. deviceOf names the interface an access point sends through.
func Explain(p *policy.Policy, conditions policy.Conditions, deviceOf func(*policy.AccessPoint) string, appName, target string) (*Explanation, error) {
	app, ok := p.Apps[appName]
	switch {
	case appName == "":
		return nil, fmt.Errorf("missing app: name one of the policy's apps")
	case !ok:
		return nil, fmt.Errorf("no app named %q in %s", appName, p.Path)
	}
	if _, _, err := net.SplitHostPort(target); err != nil {
		return nil, fmt.Errorf("invalid target %q: want host:port, like example.com:443", target)
	}
	return ExplainPlan(policy.NewPlan(app, target, conditions), target, conditions, deviceOf), nil
}

// ExplainPlan describes plan, made for a connection to target under
// conditions. deviceOf names the interface an access point sends through.
func ExplainPlan(plan policy.Plan, target string, conditions policy.Conditions, deviceOf func(*policy.AccessPoint) string) *Explanation {
	ex := &Explanation{App: plan.App.Name, Target: target, AccessPoints: []ExplainedAccess{}}
	if !plan.App.Require.IsZero() {
		ex.Requires = DescribeRequirement(plan.App.Require)
	}
	if plan.Destination == nil {
		ex.Error = plan.Err().Error()
		return ex
	}
	ex.Destination = plan.Destination.Name
	ex.Rules = DescribeRules(plan.Destination)

	order := make(map[*policy.AccessPoint]int, len(plan.Candidates))
	for i, ap := range plan.Candidates {
		order[ap] = i + 1
	}
	left := make(map[*policy.AccessPoint]policy.Unusable, len(plan.Unusable))
	for _, u := range plan.Unusable {
		left[u.AccessPoint] = u
	}
	held := make(map[*policy.AccessPoint]time.Time, len(plan.Held))
	for _, h := range plan.Held {
		held[h.AccessPoint] = h.Until
	}
	for _, ap := range plan.Destination.AccessPoints {
		st := conditions.Status(ap)
		e := ExplainedAccess{
			Name:      ap.Name,
			Interface: deviceOf(ap),
			Link:      DescribeLink(st.Link),
			Usable:    order[ap] > 0,
			Reason:    left[ap].Reason,
			Filtered:  left[ap].Filtered,
			Probe:     st.Probe,
			Order:     order[ap],
		}
		if until, ok := held[ap]; ok {
			e.HeldUntil = &until
		}
		ex.AccessPoints = append(ex.AccessPoints, e)
	}
	if err := plan.Err(); err != nil {
		ex.Error = err.Error()
	} else {
		ex.Chosen = plan.Candidates[0].Name
		ex.Why = plan.Why
	}
	return ex
}

// DescribeRules returns, in words, how d chooses and what happens to the
// open connections when its choice changes.
func DescribeRules(d *policy.Destination) string {
	rules := "select " + d.Select.String()
	switch d.Select {
	case policy.SelectLatency:
		rules += fmt.Sprintf(" (tolerance %s)", d.Tolerance)
	case policy.SelectRace:
		rules += fmt.Sprintf(" (next after %s)", d.RaceDelay)
	}
	return fmt.Sprintf("%s, hold-down %s, on_lost %s, on_better %s", rules, d.HoldDown, d.OnLost, d.OnBetter)
}

// DescribeRequirement returns, in words, what r accepts.
func DescribeRequirement(r policy.Requirement) string {
	var parts []string
	if len(r.Types) > 0 {
		types := make([]string, len(r.Types))
		for i, t := range r.Types {
			types[i] = string(t)
		}
		parts = append(parts, "type "+strings.Join(types, " or "))
	}
	if r.Metered != nil {
		if *r.Metered {
			parts = append(parts, "metered")
		} else {
			parts = append(parts, "unmetered")
		}
	}
	return strings.Join(parts, ", ")
}

// DescribeLink says in words what the policy gives about an interface: its
// type, cost and whether it is metered.
func DescribeLink(l policy.Link) string {
	linkType := string(l.Type)
	if linkType == "" {
		linkType = "no type"
	}
	metered := "unmetered"
	if l.Metered {
		metered = "metered"
	}
	return fmt.Sprintf("%s, cost %d, %s", linkType, l.Cost, metered)
}

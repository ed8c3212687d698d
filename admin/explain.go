package admin

import (
	"fmt"
	"net"

	"iapd/policy"
)

// Explanation is the document of GET /v1/explain: what iapd would do with
// a connection of an app to a target now, without dialling it.
type Explanation struct {
	App          string            `json:"app"`
	Target       string            `json:"target"`
	Destination  string            `json:"destination"`
	AccessPoints []ExplainedAccess `json:"access_points"` // in the order they would be tried
	Chosen       string            `json:"chosen,omitempty"`
	Error        string            `json:"error,omitempty"` // the reason that no access point would be tried
}

// ExplainedAccess is one access point of the destination and whether it
// would be tried.
type ExplainedAccess struct {
	Name      string `json:"name"`
	Interface string `json:"interface"`
	Usable    bool   `json:"usable"`
	Reason    string `json:"reason,omitempty"`
	Order     int    `json:"order,omitempty"` // 1 for the first to try; 0 when it would not be tried
}

// Explain decides, with policy.NewPlan, which access points a connection
// of the app called appName to target (host:port) would try under
// usability. deviceOf names the interface an access point sends through.
func Explain(p *policy.Policy, usability policy.Usability, deviceOf func(*policy.AccessPoint) string, appName, target string) (*Explanation, error) {
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

	plan := policy.NewPlan(app, target, usability)
	ex := &Explanation{App: app.Name, Target: target, Destination: plan.Destination.Name, AccessPoints: []ExplainedAccess{}}
	order := make(map[*policy.AccessPoint]int, len(plan.Candidates))
	for i, ap := range plan.Candidates {
		order[ap] = i + 1
	}
	reasons := make(map[*policy.AccessPoint]string, len(plan.Unusable))
	for _, u := range plan.Unusable {
		reasons[u.AccessPoint] = u.Reason
	}
	for _, ap := range plan.Destination.AccessPoints {
		ex.AccessPoints = append(ex.AccessPoints, ExplainedAccess{
			Name:      ap.Name,
			Interface: deviceOf(ap),
			Usable:    order[ap] > 0,
			Reason:    reasons[ap],
			Order:     order[ap],
		})
	}
	if err := plan.Err(); err != nil {
		ex.Error = err.Error()
	} else {
		ex.Chosen = plan.Candidates[0].Name
	}
	return ex, nil
}

package admin

import (
	"embed"
	"html/template"
	"io/fs"
	"net/http"
	"time"
)

// The status page is plain HTML, CSS and JavaScript in page/, served from
// the binary. The first state is embedded in the HTML, so the page shows
// everything as soon as it loads; the script then follows /v1/events and
// fetches the state again after every event and every few seconds.
//
//go:embed page
var pageFiles embed.FS

var pageTemplate = template.Must(template.ParseFS(pageFiles, "page/index.html"))

// PageState is the state embedded in the status page, the same documents
// that the read-only API serves.
type PageState struct {
	Status       Status              `json:"status"`
	Interfaces   []InterfaceStatus   `json:"interfaces"`
	AccessPoints []AccessPointStatus `json:"access_points"`
	Destinations []DestinationStatus `json:"destinations"`
	Apps         []AppStatus         `json:"apps"`
	Connections  []Conn              `json:"connections"`
}

func (s *Server) pageState() PageState {
	d := s.cfg.Daemon
	return PageState{
		Status:       s.status(),
		Interfaces:   interfaces(d.Snapshot()),
		AccessPoints: s.accessPoints(),
		Destinations: destinations(d.Policy(), d.Conditions()),
		Apps:         s.apps(),
		Connections:  s.conns(time.Now()),
	}
}

func (s *Server) handlePage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	// The page loads nothing from elsewhere and runs only its own script.
	w.Header().Set("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'")
	if err := pageTemplate.Execute(w, s.pageState()); err != nil {
		s.logger.Debug("writing status page failed", "err", err)
	}
}

// pageAssets serves the page's script and style sheet under /static/.
func pageAssets() http.Handler {
	sub, err := fs.Sub(pageFiles, "page")
	if err != nil {
		panic("admin: page files missing: " + err.Error())
	}
	return http.StripPrefix("/static/", http.FileServerFS(sub))
}

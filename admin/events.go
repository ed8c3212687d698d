package admin

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"iapd/internal/logkey"
)

const (
	// eventBuffer is how many events a stream holds for a slow reader
	// before it misses some; the bus counts what it drops.
	eventBuffer = 256
	// heartbeatInterval spaces the comments that keep an idle stream
	// from looking dead to proxies and to the reader.
	heartbeatInterval = 15 * time.Second
)

// handleEvents streams the event bus as server-sent events (the
// text/event-stream format of the HTML standard): each event is one
// message with its sequence number as id and its JSON, kind included, as
// data. Messages carry no event name, so that a reader gets kinds added
// later without knowing them. The stream starts with a comment, so a client knows it is
// subscribed, and lasts until the client goes or the server closes.
func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		writeError(w, http.StatusInternalServerError, fmt.Errorf("streaming is not supported on this connection"))
		return
	}
	s.streams.Add(1)
	defer s.streams.Done()

	events, unsubscribe := s.cfg.Bus.Subscribe(eventBuffer)
	defer unsubscribe()
	s.logger.Debug("event stream opened", "remote", r.RemoteAddr)
	defer s.logger.Debug("event stream closed", "remote", r.RemoteAddr)

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": subscribed\n\n")
	flusher.Flush()

	heartbeat := time.NewTicker(heartbeatInterval)
	defer heartbeat.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-s.done:
			return
		case <-heartbeat.C:
			if _, err := fmt.Fprint(w, ": heartbeat\n\n"); err != nil {
				return
			}
		case e := <-events:
			data, err := json.Marshal(e)
			if err != nil {
				s.logger.Error("encoding event failed", "kind", e.Kind, logkey.Err, err)
				continue
			}
			if _, err := fmt.Fprintf(w, "id: %d\ndata: %s\n\n", e.Seq, data); err != nil {
				return
			}
		}
		flusher.Flush()
	}
}

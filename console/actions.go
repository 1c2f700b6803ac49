package console

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/exactlyonce/exactly/outbox"
)

// action is what a POST changes.
type action struct {
	name  string // retry or purge
	verb  string // for the pages: "Retry", "Purge"
	done  string // past tense for the log and the pages
	apply func(c *Console, ctx context.Context, ids []string) (int64, error)
}

var (
	actionRetry = action{name: "retry", verb: "Retry", done: "retried",
		apply: func(c *Console, ctx context.Context, ids []string) (int64, error) {
			return c.cfg.Outbox.RetryDead(ctx, c.db, outbox.DeadFilter{IDs: ids})
		}}
	actionPurge = action{name: "purge", verb: "Purge", done: "purged",
		apply: func(c *Console, ctx context.Context, ids []string) (int64, error) {
			return c.cfg.Outbox.PurgeDead(ctx, c.db, outbox.DeadFilter{IDs: ids})
		}}
)

// ConfirmPage lists what an action will change, before it does.
type ConfirmPage struct {
	Action   string    `json:"action"`
	Verb     string    `json:"-"`
	IDs      []string  `json:"ids"`
	Messages []DeadRow `json:"messages"` // the dead ones among IDs: the action changes only these
	Back     string    `json:"-"`
}

// DonePage is what an action changed.
type DonePage struct {
	Action    string   `json:"action"`
	Requested []string `json:"requested_ids"`
	Changed   int64    `json:"changed"`
	Done      string   `json:"-"`
	Back      string   `json:"-"`
}

// errReadOnly refuses actions on a read-only console.
var errReadOnly = errors.New("this console is read-only: actions are disabled (enable them with --console-actions, or Config.Actions)")

func (c *Console) action(a action) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !c.cfg.Actions {
			c.log.Warn("console: action refused, the console is read-only", "action", a.name, "remote", r.RemoteAddr)
			c.fail(w, r, http.StatusForbidden, errReadOnly)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, 1<<20)
		if err := r.ParseForm(); err != nil {
			c.fail(w, r, http.StatusBadRequest, fmt.Errorf("reading the form: %w", err))
			return
		}
		if err := c.checkCSRF(r); err != nil {
			c.log.Warn("console: action refused", "action", a.name, "remote", r.RemoteAddr, "reason", err.Error())
			c.fail(w, r, http.StatusForbidden, err)
			return
		}
		var ids []string
		for _, id := range r.PostForm["id"] {
			if id = strings.TrimSpace(id); id != "" && !slices.Contains(ids, id) {
				ids = append(ids, id)
			}
		}
		switch {
		case len(ids) == 0:
			c.fail(w, r, http.StatusBadRequest, fmt.Errorf("%s: no message selected (send the ids as id=...)", a.name))
			return
		case len(ids) > maxList:
			c.fail(w, r, http.StatusBadRequest, fmt.Errorf("%s: %d messages selected, at most %d at once", a.name, len(ids), maxList))
			return
		}
		back := r.PostForm.Get("back")
		if !strings.HasPrefix(back, "dead") && !strings.HasPrefix(back, "find") {
			back = "dead"
		}
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		if r.PostForm.Get("confirm") != "yes" {
			msgs, err := c.cfg.Outbox.ListDead(ctx, c.db, outbox.DeadFilter{IDs: ids})
			if err != nil {
				c.fail(w, r, http.StatusInternalServerError, err)
				return
			}
			p := ConfirmPage{Action: a.name, Verb: a.verb, IDs: ids, Messages: []DeadRow{}, Back: back}
			for _, m := range msgs {
				p.Messages = append(p.Messages, deadRow(m))
			}
			c.render(w, r, http.StatusOK, "confirm", p)
			return
		}
		n, err := a.apply(c, ctx, ids)
		if err != nil {
			c.log.Error("console: action failed", "action", a.name, "table", c.cfg.Outbox.Table(), "ids", ids, "remote", r.RemoteAddr, "err", err)
			c.fail(w, r, http.StatusInternalServerError, err)
			return
		}
		c.log.Info("console: "+a.done+" dead messages", "action", a.name, "table", c.cfg.Outbox.Table(), "ids", ids,
			"requested", len(ids), "changed", n, "remote", r.RemoteAddr)
		c.render(w, r, http.StatusOK, "done", DonePage{Action: a.name, Requested: ids, Changed: n, Done: a.done, Back: back})
	}
}

// checkCSRF accepts a POST that carries the console's token (form field
// csrf, or header X-CSRF-Token) and that a browser did not send from
// another site.
func (c *Console) checkCSRF(r *http.Request) error {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" && site != "none" {
		return fmt.Errorf("refused: the request came from another site (Sec-Fetch-Site %s)", site)
	}
	tok := r.PostForm.Get("csrf")
	if tok == "" {
		tok = r.Header.Get("X-CSRF-Token")
	}
	if tok == "" {
		return errors.New("refused: the request carries no CSRF token (reload the page and try again)")
	}
	if subtle.ConstantTimeCompare([]byte(tok), []byte(c.csrf)) != 1 {
		return errors.New("refused: the CSRF token does not match (the console restarted? reload the page)")
	}
	return nil
}

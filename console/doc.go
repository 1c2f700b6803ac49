// Package console is the operators' web console of an outbox pipeline: what
// is pending, failing and dead, which keys are held back, which relays hold
// which partitions, how far a CDC slot lags, what each inbox recorded, and
// where a message is now, found by its id. Dead messages can be retried or
// purged from it when actions are enabled.
//
// A Console is an http.Handler. `exactly console` serves it on its own, and
// `exactly relay --console` mounts it on the relay's admin server under
// /console/; a service mounts it on its own admin mux the same way:
//
//	c, err := console.New(console.Config{DB: db, Outbox: ob, Inboxes: []string{"exactly_inbox"}})
//	...
//	go c.Run(ctx) // the samples behind the overview's chart
//	mux.Handle("/console/", http.StripPrefix("/console", c))
//
// Every page links relatively, so it works under any prefix. The pages are
// HTML templates and a little JavaScript embedded in the binary: nothing is
// loaded from elsewhere, and the pages work offline. Every page is also JSON:
// add ?format=json, or send Accept: application/json.
//
// Pages: the overview (/), dead messages (/dead), blocked keys (/blocked),
// relays and CDC slots (/relays), inboxes (/inbox), and a message by id
// (/find?id=...).
//
// The overview's chart is drawn from samples the console takes itself,
// every Config.SampleInterval (10 seconds by default), of the last hour:
// right after the console starts it holds one sample, the published rate
// needs two, and the chart fills as the hour passes (the page says since
// when it samples). The published rate comes from the relay's counters when
// Config.Metrics gathers them (a relay in the same process, exactlyprom's
// exactly_relay_published_total); otherwise it is estimated from the table:
// the rise of its greatest seq (what was enqueued) less the rise of the
// pending and dead rows. The estimate counts purged dead messages and seq
// gaps left by rolled-back inserts as published, and falls short while the
// table is empty.
//
// Safe by default: the console is read-only unless Config.Actions is set.
// Actions are POST requests carrying the console's CSRF token (a hidden form
// field, or the X-CSRF-Token header for scripts, taken from the JSON of any
// page), refused from other sites (Sec-Fetch-Site), confirmed on a page that
// lists what they will change, applied to the message ids listed there and
// logged with the ids and counts they changed. Answers go through the
// module's redaction, and the database is shown only with its password
// hidden. The console has no authentication of its own: serve it on a
// loopback address, or behind a proxy that authenticates.
package console

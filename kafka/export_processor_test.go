package kafka

// SetProcessorAbortHook installs fn, which runs before each commit of p:
// when it returns true the transaction is aborted instead.
func SetProcessorAbortHook(p *Processor, fn func() bool) { p.abortHook = fn }

// CrashProcessor closes p's client without ending its open transaction,
// as a crash would leave it; p's Run then returns.
func CrashProcessor(p *Processor) {
	p.crashed.Store(true)
	if h := p.cur.Load(); h != nil {
		h.close()
	}
}

// OutputID is the id the processor derives for the i-th output of the
// input message with id inID.
func OutputID(inID string, i int) string { return outputID(inID, i) }

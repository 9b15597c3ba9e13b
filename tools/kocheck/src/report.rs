//! The outcome of one rule, and how it is printed: `PASS rule: detail` / `FAIL rule: detail`,
//! with the individual findings indented below so a failing line points at the bytes.

pub struct Verdict {
    pub rule: String,
    pub pass: bool,
    pub detail: String,
    /// One line per offending item (instruction, relocation, symbol, section).
    pub findings: Vec<String>,
}

/// Findings printed under a FAIL line without `--verbose`: enough to act on, short enough to read.
const FINDINGS_SHOWN: usize = 12;

impl Verdict {
    pub fn pass(rule: impl Into<String>, detail: impl Into<String>) -> Self {
        Verdict { rule: rule.into(), pass: true, detail: detail.into(), findings: Vec::new() }
    }

    pub fn fail(rule: impl Into<String>, detail: impl Into<String>) -> Self {
        Verdict { rule: rule.into(), pass: false, detail: detail.into(), findings: Vec::new() }
    }

    /// PASS when `findings` is empty, else FAIL with `what` counted in the detail.
    pub fn from_findings(rule: &str, ok_detail: String, what: &str, findings: Vec<String>) -> Self {
        if findings.is_empty() {
            Verdict::pass(rule, ok_detail)
        } else {
            let n = findings.len();
            Verdict { rule: rule.into(), pass: false, detail: format!("{n} {what}"), findings }
        }
    }

    pub fn print(&self, verbose: bool) {
        let word = if self.pass { "PASS" } else { "FAIL" };
        println!("{word} {}: {}", self.rule, self.detail);
        let shown = if verbose { self.findings.len() } else { FINDINGS_SHOWN };
        for f in self.findings.iter().take(shown) {
            println!("    {f}");
        }
        if self.findings.len() > shown {
            println!("    ... {} more (--verbose shows all)", self.findings.len() - shown);
        }
    }
}

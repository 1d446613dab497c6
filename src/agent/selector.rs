//! Calico label selectors (`nodeSelector`, `peerSelector`): the expression language of
//! `projectcalico.org/v3`, evaluated against a node's labels.
//!
//! Supported: `all()`, `global()` (true for nodes), `has(k)`, `k == "v"`, `k != "v"`,
//! `k in {"a", "b"}`, `k not in {...}`, `k contains "s"`, `k starts with "s"`,
//! `k ends with "s"`, `!expr`, `&&`, `||` and parentheses; strings in single or double
//! quotes. As in Calico, `k != "v"` and `k not in {...}` are also true when `k` is absent.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// A selector that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {text:?}: {message} at offset {offset}")]
pub struct SelectorError {
    pub text: String,
    pub offset: usize,
    pub message: String,
}

impl Selector {
    /// Parses Calico's selector syntax. An empty string selects everything.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser { text, pos: 0 };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected text"));
        }
        Ok(sel)
    }

    /// Whether `labels` match.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::Contains(k, s) => labels.get(k).is_some_and(|l| l.contains(s.as_str())),
            Selector::StartsWith(k, s) => labels.get(k).is_some_and(|l| l.starts_with(s.as_str())),
            Selector::EndsWith(k, s) => labels.get(k).is_some_and(|l| l.ends_with(s.as_str())),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| {
            vs.iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Selector::All => f.write_str("all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {v:?}"),
            Selector::Ne(k, v) => write!(f, "{k} != {v:?}"),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Selector::Contains(k, s) => write!(f, "{k} contains {s:?}"),
            Selector::StartsWith(k, s) => write!(f, "{k} starts with {s:?}"),
            Selector::EndsWith(k, s) => write!(f, "{k} ends with {s:?}"),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn error(&self, message: &str) -> SelectorError {
        SelectorError {
            text: self.text.to_string(),
            offset: self.pos,
            message: message.to_string(),
        }
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    /// Consumes `token` (after whitespace) if it comes next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// Consumes the keyword `word` when it is followed by a non-identifier character.
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(word)
            && !rest[word.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
        {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Selector::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Selector::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        if self.rest().starts_with("!") && !self.rest().starts_with("!=") {
            self.pos += 1;
            return Ok(Selector::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            if !self.eat(")") {
                return Err(self.error("expected ')'"));
            }
            return Ok(inner);
        }
        if self.eat_word("all") {
            return self.empty_call(Selector::All);
        }
        if self.eat_word("global") {
            return self.empty_call(Selector::All);
        }
        if self.eat_word("has") {
            if !self.eat("(") {
                return Err(self.error("expected '(' after has"));
            }
            let key = self.key()?;
            if !self.eat(")") {
                return Err(self.error("expected ')'"));
            }
            return Ok(Selector::Has(key));
        }
        let key = self.key()?;
        if self.eat("==") {
            return Ok(Selector::Eq(key, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(key, self.string()?));
        }
        if self.eat_word("in") {
            return Ok(Selector::In(key, self.set()?));
        }
        if self.eat_word("not") {
            if !self.eat_word("in") {
                return Err(self.error("expected 'in' after 'not'"));
            }
            return Ok(Selector::NotIn(key, self.set()?));
        }
        if self.eat_word("contains") {
            return Ok(Selector::Contains(key, self.string()?));
        }
        if self.eat_word("starts") {
            if !self.eat_word("with") {
                return Err(self.error("expected 'with' after 'starts'"));
            }
            return Ok(Selector::StartsWith(key, self.string()?));
        }
        if self.eat_word("ends") {
            if !self.eat_word("with") {
                return Err(self.error("expected 'with' after 'ends'"));
            }
            return Ok(Selector::EndsWith(key, self.string()?));
        }
        Err(self
            .error("expected an operator (==, !=, in, not in, contains, starts with, ends with)"))
    }

    fn empty_call(&mut self, sel: Selector) -> Result<Selector, SelectorError> {
        if self.eat("(") && self.eat(")") {
            Ok(sel)
        } else {
            Err(self.error("expected '()'"))
        }
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || "-_./".contains(c)))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.error("expected a label key"));
        }
        let key = self.rest()[..len].to_string();
        self.pos += len;
        Ok(key)
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.rest().chars().next() {
            Some(q @ ('"' | '\'')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        let body = &self.rest()[1..];
        let end = body
            .find(quote)
            .ok_or_else(|| self.error("unterminated string"))?;
        let value = body[..end].to_string();
        self.pos += end + 2;
        Ok(value)
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        if !self.eat("{") {
            return Err(self.error("expected '{'"));
        }
        let mut values = Vec::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.push(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            if !self.eat(",") {
                return Err(self.error("expected ',' or '}'"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn calico_examples() {
        let node = labels(&[
            ("rack", "r1"),
            ("route-reflector", "true"),
            ("zone", "eu-1a"),
        ]);
        let cases = [
            ("", true),
            ("all()", true),
            ("has(rack)", true),
            ("!has(rack)", false),
            ("has(gpu)", false),
            ("rack == 'r1'", true),
            ("rack == \"r2\"", false),
            ("rack != 'r2'", true),
            ("gpu != 'x'", true),
            ("rack in {'r1', 'r2'}", true),
            ("rack not in {'r1'}", false),
            ("gpu not in {'a'}", true),
            ("zone starts with 'eu-'", true),
            ("zone ends with '1b'", false),
            ("zone contains '-1'", true),
            ("route-reflector == 'true' && rack == 'r1'", true),
            ("rack == 'r2' || has(zone)", true),
            ("!(rack == 'r1' && has(zone))", false),
            ("rack == 'r2' || rack == 'r3' && has(zone)", false),
        ];
        for (text, want) in cases {
            let sel = Selector::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(sel.matches(&node), want, "{text} parsed as {sel}");
        }
    }

    #[test]
    fn errors_name_the_offset() {
        for bad in [
            "rack ==",
            "rack = 'a'",
            "has(rack",
            "rack in {'a'",
            "(a == 'b'",
            "a == 'b' c",
        ] {
            let err = Selector::parse(bad).unwrap_err();
            assert!(err.offset <= bad.len(), "{bad}: {err}");
        }
        assert_eq!(
            Selector::parse("rack ~ 'a'").unwrap_err().to_string(),
            "selector \"rack ~ 'a'\": expected an operator (==, !=, in, not in, contains, \
             starts with, ends with) at offset 5"
        );
    }
}

//! IAM wildcard matching (`*` and `?`), in time linear in the text for any pattern.
//!
//! Kept as this small automaton rather than the `regex` crate (a dependency since the AWS
//! model's patterns need it): IAM globs have two wildcards, the common shapes compare
//! directly with nothing compiled, and a compiled regex per policy value would be memory
//! kept per cached key policy. The property test below checks it against a reference
//! matcher on random patterns and texts.

use std::collections::HashMap;

/// IAM wildcard matching: `*` any run of characters, `?` any one character.
///
/// Its cost is linear in the text for any pattern: the common shapes (no wildcard, one
/// trailing `*`) are compared directly, and every other pattern runs as a bit-parallel
/// automaton, O(text x pattern / 64) with no backtracking. (The classic backtracking
/// matcher took pattern x text steps: a 30,000-character `StringLike` against a large
/// encryption context value stalled the server for most of a minute.)
pub fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let eq = |a: &str, b: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    match pattern.find(['*', '?']) {
        None => eq(pattern, text),
        Some(i) if i + 1 == pattern.len() && pattern.ends_with('*') => {
            text.get(..i).is_some_and(|head| eq(&pattern[..i], head))
        }
        Some(_) => Automaton::new(pattern, ignore_case).matches(text),
    }
}

/// A wildcard pattern as a set of positions: bit `i` set means "the first `i` tokens have
/// matched the text read so far". Runs of `*` are collapsed, so a star's bit never feeds
/// another star.
struct Automaton {
    ignore_case: bool,
    /// Tokens in the pattern; bit `tokens` is the accepting position.
    tokens: usize,
    /// Characters the pattern needs at least (its tokens that are not `*`).
    min_len: usize,
    any: Vec<u64>,
    star: Vec<u64>,
    chars: HashMap<char, Vec<u64>>,
}

impl Automaton {
    fn new(pattern: &str, ignore_case: bool) -> Automaton {
        enum Tok {
            Star,
            Any,
            Char(char),
        }
        let mut toks: Vec<Tok> = Vec::new();
        for c in pattern.chars() {
            match c {
                '*' if matches!(toks.last(), Some(Tok::Star)) => {}
                '*' => toks.push(Tok::Star),
                '?' => toks.push(Tok::Any),
                c if ignore_case => toks.push(Tok::Char(c.to_ascii_lowercase())),
                c => toks.push(Tok::Char(c)),
            }
        }
        let words = (toks.len() + 1).div_ceil(64);
        let (mut any, mut star) = (vec![0u64; words], vec![0u64; words]);
        let mut chars: HashMap<char, Vec<u64>> = HashMap::new();
        let set = |v: &mut Vec<u64>, i: usize| v[i / 64] |= 1 << (i % 64);
        for (i, t) in toks.iter().enumerate() {
            match t {
                Tok::Star => set(&mut star, i),
                Tok::Any => set(&mut any, i),
                Tok::Char(c) => set(chars.entry(*c).or_insert_with(|| vec![0; words]), i),
            }
        }
        Automaton {
            ignore_case,
            tokens: toks.len(),
            min_len: toks.iter().filter(|t| !matches!(t, Tok::Star)).count(),
            any,
            star,
            chars,
        }
    }

    fn matches(&self, text: &str) -> bool {
        if text.chars().count() < self.min_len {
            return false;
        }
        let words = self.any.len();
        let mut state = vec![0u64; words];
        let mut next = vec![0u64; words];
        state[0] = 1;
        self.close(&mut state);
        for c in text.chars() {
            let c = if self.ignore_case {
                c.to_ascii_lowercase()
            } else {
                c
            };
            let exact = self.chars.get(&c);
            let mut carry = 0u64;
            let mut alive = 0u64;
            for w in 0..words {
                let hit = self.any[w] | exact.map_or(0, |m| m[w]);
                let moved = state[w] & hit;
                next[w] = (moved << 1) | carry | (state[w] & self.star[w]);
                carry = moved >> 63;
                alive |= next[w];
            }
            if alive == 0 {
                return false;
            }
            std::mem::swap(&mut state, &mut next);
            self.close(&mut state);
        }
        state[self.tokens / 64] & (1 << (self.tokens % 64)) != 0
    }

    /// A position before a `*` also stands after it (the star matched nothing).
    fn close(&self, state: &mut [u64]) {
        let mut carry = 0u64;
        for (word, star) in state.iter_mut().zip(&self.star) {
            let at_star = *word & star;
            *word |= (at_star << 1) | carry;
            carry = at_star >> 63;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: IAM wildcards by recursion, exponential but obviously right.
    fn slow_glob(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some('*'), _) => slow_glob(&p[1..], t) || (!t.is_empty() && slow_glob(p, &t[1..])),
            (Some(_), None) => false,
            (Some('?'), Some(_)) => slow_glob(&p[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && slow_glob(&p[1..], &t[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn glob_agrees_with_the_reference(p in "[ab*?\u{e9}]{0,12}", t in "[ab\u{e9}]{0,14}") {
            let (pc, tc): (Vec<char>, Vec<char>) = (p.chars().collect(), t.chars().collect());
            proptest::prop_assert_eq!(glob(&p, &t, false), slow_glob(&pc, &tc), "{} {}", p, t);
        }
    }

    #[test]
    fn glob_is_linear_in_hostile_cases() {
        // Pattern x text steps for the backtracking matcher: 3e4 x 6.5e4; here x / 64.
        let pattern = format!("*{}b*", "a?".repeat(15_000));
        let text = "a".repeat(1 << 16);
        assert!(!glob(&pattern, &text, false));
        let long = format!("*{}*", "a".repeat(100));
        assert!(glob(&long, &"a".repeat(8192), false));
        assert!(!glob(&long, &"a".repeat(99), false));
        // Across the 64-bit word boundary of the automaton.
        let p = format!("{}*{}", "x?".repeat(40), "y".repeat(30));
        let t = format!("{}zz{}", "xq".repeat(40), "y".repeat(30));
        assert!(glob(&p, &t, false));
        assert!(!glob(&p, &t[1..], false));
        assert!(glob("KMS:*crypt", "kms:ReEncrypt", true));
    }

    #[test]
    fn globs() {
        assert!(glob("kms:*", "kms:Encrypt", true));
        assert!(glob("KMS:encrypt", "kms:Encrypt", true));
        assert!(!glob("kms:Encrypt", "kms:encrypt", false));
        assert!(glob(
            "kms:GenerateDataKey*",
            "kms:GenerateDataKeyWithoutPlaintext",
            true
        ));
        assert!(glob("kms:Re*", "kms:ReEncryptFrom", true));
        assert!(!glob("kms:Re*", "kms:Decrypt", true));
        assert!(glob("a?c", "abc", false));
        assert!(!glob("a?c", "ac", false));
        assert!(glob("*a*b*", "xxaxxbxx", false));
        assert!(!glob("*a*b", "xxaxxbxx", false));
        assert!(glob("", "", false));
        assert!(!glob("", "x", false));
    }
}

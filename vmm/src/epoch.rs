//! Epoch pages: what the primary logs for a page written since the last
//! epoch, and how the backup turns it back into the page.

use ft_log::Page;

/// The content of every page as the last epoch carried it, kept alike by
/// primary and backup, so that a page carried again travels as an XOR
/// delta (mostly zeros, which the log's compression removes).
#[derive(Default)]
pub struct EpochPages {
    last: std::collections::HashMap<u64, Box<[u8]>>,
}

impl EpochPages {
    /// Primary: the page to log for `gfn` whose content is now `now`.
    pub fn encode(&mut self, gfn: u64, now: &[u8]) -> Page {
        let page = match self.last.get(&gfn) {
            Some(prev) => Page {
                gfn,
                delta: true,
                data: now.iter().zip(prev.iter()).map(|(a, b)| a ^ b).collect(),
            },
            None => Page {
                gfn,
                delta: false,
                data: now.to_vec(),
            },
        };
        self.last.insert(gfn, now.into());
        page
    }

    /// Backup: the page content a logged page stands for.
    pub fn decode(&mut self, p: &Page) -> Result<Box<[u8]>, String> {
        let page: Box<[u8]> = if p.delta {
            let prev = self.last.get(&p.gfn).ok_or_else(|| {
                format!(
                    "delta for page {:#x}, which no earlier epoch carried",
                    p.gfn
                )
            })?;
            p.data.iter().zip(prev.iter()).map(|(a, b)| a ^ b).collect()
        } else {
            p.data.clone().into()
        };
        self.last.insert(p.gfn, page.clone());
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE;

    #[test]
    fn epoch_page_deltas_round_trip() {
        let mut primary = EpochPages::default();
        let mut backup = EpochPages::default();
        let mut page = vec![0u8; PAGE];
        page[10] = 1;
        let first = primary.encode(7, &page);
        assert!(!first.delta);
        assert_eq!(&*backup.decode(&first).unwrap(), &page[..]);
        page[20] = 2;
        let second = primary.encode(7, &page);
        assert!(second.delta);
        assert_eq!(
            second.data.iter().filter(|&&b| b != 0).count(),
            1,
            "only the change"
        );
        assert_eq!(&*backup.decode(&second).unwrap(), &page[..]);
        let orphan = Page {
            gfn: 9,
            delta: true,
            data: vec![0; PAGE],
        };
        assert!(backup.decode(&orphan).is_err());
    }
}

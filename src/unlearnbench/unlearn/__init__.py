"""Below the unlearn stage: the method registry (`methods`) and one forget request's named parts (`request`)."""

"""Keeping a sick replica or a burst from taking the service down: breakers, retry budgets."""

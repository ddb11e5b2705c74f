"""The site's answers to federated queries: the query service (``service``) over the filter's row mask
(``filtering``), the statistics (``statistics``, ``image_statistics``), the ledger against differencing
(``ledger``), named cohorts (``cohorts``) and mocks (``mock``). No researcher code runs for a query."""
